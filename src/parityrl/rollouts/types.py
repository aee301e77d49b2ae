"""A rollout: one sampled completion with everything the trainer needs to check and learn from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # the engine's (behaviour) logprob of each completion token
    versions: list[int]  # policy version under which each completion token was sampled
    finish_reason: str | None
    group_id: int = 0  # rollouts sampled from the same prompt share it
    reward: float | None = None
    meta: dict = field(default_factory=dict)  # task-specific (answer, prompt text, timings …)

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)

    @property
    def min_version(self) -> int:
        return min(self.versions) if self.versions else -1

    @property
    def max_version(self) -> int:
        return max(self.versions) if self.versions else -1

    def to_dict(self) -> dict:
        return asdict(self)
