"""Rollouts: what the engine hands the trainer (types.py)."""
