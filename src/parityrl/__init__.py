"""parityrl: pipeline RL for LLMs whose rollout logprobs provably match the trainer's.

The data path, one package per stage:

    tasks ──► engine (vLLM V1 AsyncLLM) ──► rollouts ──► trainer ──► weights ──► engine
                 │ behaviour logprobs          │            │ logprobs recomputed by
                 │ (engine/engine.py)          │            │ trainer/logprobs.py
                 └── doctor/ compares the two sides and names the layer at fault.

`sampling.py` is the contract both sides obey: the sampling parameters a rollout was drawn with,
and exactly which of vLLM's processing steps the trainer reproduces.
"""

__version__ = "0.1.0"
