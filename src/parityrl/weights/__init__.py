"""Weights: trainer state dict → running engine, in place, verified (shm_file.py, gloo.py, digest.py)."""

GLOO_BACKEND = "parityrl_gloo"  # weights/gloo.py registers it with vLLM in the engine's worker
