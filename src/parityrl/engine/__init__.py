"""Engine side: vLLM V1 AsyncLLM producing rollouts with behaviour logprobs (engine.py)."""
