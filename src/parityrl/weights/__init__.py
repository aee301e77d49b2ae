"""Weights: trainer state dict → running engine, in place, verified: the one update sequence
(update.py), its transports (shm_file.py, gloo.py, lora_folder.py), the digests (digest.py)."""

GLOO_BACKEND = "parityrl_gloo"  # weights/gloo.py registers it with vLLM in the engine's worker
