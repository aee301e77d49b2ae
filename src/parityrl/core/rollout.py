"""A rollout: one sampled completion (or one multi-turn episode) with everything the trainer needs to
check and learn from it.

A single-turn rollout is a prompt and the tokens the engine sampled after it. An episode is the first
turn's prompt followed by every later token in the order the engine saw them: assistant tokens
(sampled, with a behaviour logprob and a version) and observation tokens (added by the environment:
context only, never in the loss or the parity metrics). `sampled` and `turns` say which is which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # engine (behaviour) logprob of each completion token; 0: observation
    versions: list[int]  # policy version under which each completion token was sampled
    finish_reason: str | None
    # Rollouts sampled from the same prompt share it; in a run, the training problem's index
    # (the ledger's, rollouts/ledger.py; samples.jsonl's "problem_index").
    group_id: int = 0
    reward: float | None = None
    advantage: float | None = None  # set by the trainer at the start of the step that uses it
    # Multi-turn episodes: the chat-template check's finding, a sentence naming the first turn
    # whose rendering differs from the ids the engine saw (rollouts/episode.py); None = faithful,
    # or a single turn (not checked).
    template_mismatch: str | None = None
    # Task-specific data, never control data: answer, prompt text, messages, timings …
    meta: dict = field(default_factory=dict)
    # Per completion token: sampled by the engine (True) or an observation the environment added
    # (False); None = all sampled (single turn).
    sampled: list[bool] | None = None
    turns: list[int] | None = None  # per completion token: the turn it belongs to; None = all 0
    # Mixture-of-experts models: the experts the engine routed each position of prompt +
    # completion to, int16 numpy [positions, layers, top_k], -1 where none (engine/routes.py).
    routes: Any = None

    @property
    def sampled_mask(self) -> list[bool]:
        return self.sampled if self.sampled is not None else [True] * len(self.completion_ids)

    @property
    def turn_index(self) -> list[int]:
        return self.turns if self.turns is not None else [0] * len(self.completion_ids)

    @property
    def num_tokens(self) -> int:
        """Sampled tokens: the ones that enter the loss and the parity metrics."""
        return sum(self.sampled_mask)

    @property
    def num_turns(self) -> int:
        return max(self.turn_index, default=0) + 1

    def _of_sampled(self, values: list) -> list:
        return [v for v, s in zip(values, self.sampled_mask) if s]

    @property
    def sampled_logprobs(self) -> list[float]:
        """The engine's logprobs of the sampled tokens, in order: what the trainer rescores."""
        return self._of_sampled(self.logprobs)

    @property
    def sampled_versions(self) -> list[int]:
        return self._of_sampled(self.versions)

    @property
    def sampled_turns(self) -> list[int]:
        return self._of_sampled(self.turn_index)

    @property
    def min_version(self) -> int:
        return min(self.sampled_versions, default=-1)

    @property
    def max_version(self) -> int:
        return max(self.sampled_versions, default=-1)

    def parity_mask(self, version: int) -> list[bool]:
        """Per sampled token: its whole turn was sampled by weights `version`.

        Each turn is a request of its own, prefilled from token ids by the weights of the moment
        (a weight update resets the prefix cache), so a turn sampled entirely by `version` is
        reproducible from those weights alone, whatever sampled the turns before it. A turn an
        update landed in is not: its earlier tokens sit in the KV cache as the old weights
        computed them.
        """
        turns, versions = self.sampled_turns, self.sampled_versions
        pure = {t: True for t in turns}
        for t, v in zip(turns, versions):
            pure[t] = pure[t] and v == version
        return [pure[t] for t in turns]


# Rollouts sampled from one prompt: the unit of advantages, of staleness and of the ledger.
Group = list[Rollout]
