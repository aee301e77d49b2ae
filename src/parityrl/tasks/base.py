"""The task interface: a deterministic stream of problems and a verifiable reward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    index: int  # position in its split's stream (train: the data position used for resume)
    prompt: str  # the text of the request (without a chat template: exactly what the model sees)
    answer: str  # reference answer the reward compares against
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    # Chat messages to render with the tokenizer's chat template; None = `prompt` as plain text.
    messages: tuple[dict, ...] | None = field(default=None, compare=False, hash=False)


class Task(Protocol):
    name: str

    def train_problem(self, index: int) -> Problem:
        """The index-th training problem; a pure function of (task config, index)."""

    def eval_problems(self) -> list[Problem]:
        """Held-out problems, never returned by `train_problem`."""

    def reward(self, problem: Problem, completion: str) -> float:
        """Score a completion (text, special tokens removed); 1.0 = correct."""
