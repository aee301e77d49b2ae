"""Weights: trainer state dict → running engine, in place, verified (transfer.py, digest.py)."""
