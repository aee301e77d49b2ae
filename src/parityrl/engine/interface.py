"""The one engine interface: what the actor, evaluation, the doctor and the run call.

Four kinds implement it and pass the same test (tests/test_weight_sync.py, tests/test_ray.py):
`RolloutEngine` (vLLM's AsyncLLM in this process's control), `EnginePool` (one or several
engines, one update for all), `RayEngine` (cluster/engine_role.py: an engine in a Ray actor, its
driver-side stand-in) and the test suite's `SharedEngine` (tests/engine_host.py). Every update
goes through weights/update.py `push`, whatever the kind and the transport.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.engine.settings import EngineSettings
from parityrl.weights.update import UpdateReport


@runtime_checkable
class Engine(Protocol):
    settings: EngineSettings

    @property
    def version(self) -> int:
        """The policy version the engine's weights carry (the trainer's optimizer step)."""
        ...

    @property
    def preemption_counter(self):
        """Requests vLLM preempted so far (engine/engine.py PreemptionCounter), or None."""
        ...

    async def generate(self, prompt_ids: list[int], sampling: SamplingConfig, *, n: int = 1,
                       seed: int | None = None, group_id: int = 0) -> list[Rollout]:
        """`n` completions of one prompt, each token with its behaviour logprob and version."""
        ...

    async def generate_many(self, prompts: list[list[int]], sampling: SamplingConfig, *,
                            n: int = 1, seed: int | None = None) -> list[Rollout]:
        """All prompts in flight at once; rollouts in prompt order."""
        ...

    async def update_weights(self, state_dict: dict[str, torch.Tensor], *,
                             version: int | None = None, verify: bool = True,
                             skip: set[str] = frozenset(),
                             reset_prefix_cache: bool = True) -> UpdateReport:
        """Every weight, in place, requests in flight kept (weights/update.py)."""
        ...

    async def update_adapter(self, tensors: dict[str, torch.Tensor], lora: dict, *,
                             version: int | None = None, verify: bool = True,
                             **options) -> UpdateReport:
        """A LoRA adapter, in place, requests in flight kept (weights/lora_folder.py)."""
        ...

    def resolved_settings(self) -> dict:
        """What vLLM resolved and the worker runs with (engine/settings.py), not what was asked."""
        ...

    async def alive(self) -> bool: ...

    async def close(self) -> None: ...
