"""Trainer side: recompute logprobs of engine rollouts (logprobs.py) and learn from them."""
