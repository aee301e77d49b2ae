"""Synthetic arithmetic ("12+7=" → "19"), generated on the fly: a task that needs no data.

Held-out problems are chosen by a stable hash of the problem itself, so the split does not depend on
how problems are drawn: `train_problem` redraws past them and `eval_problems` picks only them.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from parityrl.core.errors import UserError
from parityrl.tasks.base import Problem

Op = Literal["+", "-", "*"]

# Up to this many problems the eval set is found by enumerating the whole space; above, by sampling.
ENUMERATE_LIMIT = 200_000
# Draws allowed before we decide the configuration leaves (almost) nothing on one side of the split.
MAX_TRAIN_REDRAWS = 10_000
MAX_EVAL_DRAWS = 1_000_000

_LEADING_INT = re.compile(r"-?\d+")
_ANY_INT = re.compile(r"-?\d[\d,]*")


class ArithmeticConfig(BaseModel):
    """Two-operand integer arithmetic; prompts look like "12+7=" and answers like "19"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["arithmetic"] = Field("arithmetic", description="Generated two-operand "
                                        "integer problems; reward 1 when the completion's number "
                                        "is the answer, else 0.")
    digits: int = Field(
        2, ge=1, le=6, description="Operands are drawn uniformly from 0..10**digits-1."
    )
    second_digits: int | None = Field(
        None, ge=1, le=6, description="Max digits of the second operand; defaults to `digits`."
    )
    ops: list[Op] = Field(["+"], min_length=1, description="Operators to draw from, uniformly.")
    allow_negative: bool = Field(
        False, description='For "-": if false, operands are ordered so the result is >= 0.'
    )
    eval_size: int = Field(200, ge=1, description="Number of held-out problems to evaluate on.")
    eval_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Fraction of all problems reserved as held out (by hash)."
    )
    seed: int = Field(0, description="Seeds the training stream and the held-out split.")
    reward_timeout_s: float | None = Field(
        60.0, gt=0, description="Seconds the reward may take for one group; longer is a "
                                "rejection (the run goes on). None = no limit.")
    chat_template: bool = Field(
        False, description='Ask in words through the tokenizer\'s chat template (instruct models) '
                           'instead of the bare "12+7=" that the built-in character models know.')
    chat_prompt: str = Field(
        "What is {a} {op} {b}? Reply with just the number.",
        description="The chat variant's user message; {a}, {op}, {b} are filled in.")
    system: str | None = Field(None, description="Chat variant: a system message.")


class ArithmeticTask:
    name = "arithmetic"

    def __init__(self, config: ArithmeticConfig):
        self.config = config
        self.ops: list[str] = list(dict.fromkeys(config.ops))  # duplicates would skew the op mix
        self.a_range = 10**config.digits
        self.b_range = 10 ** (config.second_digits or config.digits)
        self._eval: list[Problem] | None = None  # computed on first use

    # --- the problem space ---

    def _canonical(self, a: int, op: str, b: int) -> tuple[int, str, int]:
        if op == "-" and not self.config.allow_negative and a < b:
            a, b = b, a
        return a, op, b

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        op = rng.choice(self.ops)
        return self._canonical(rng.randrange(self.a_range), op, rng.randrange(self.b_range))

    def _hash_fraction(self, p: tuple[int, str, int]) -> float:
        # hashlib, not hash(): Python salts str hashes per process, and the split must be stable.
        a, op, b = p
        digest = hashlib.blake2b(f"{self.config.seed}:{a}{op}{b}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def _held_out(self, p: tuple[int, str, int]) -> bool:
        return self._hash_fraction(p) < self.config.eval_fraction

    def _problem(self, index: int, p: tuple[int, str, int]) -> Problem:
        a, op, b = p
        result = a + b if op == "+" else a - b if op == "-" else a * b
        meta = {"a": a, "op": op, "b": b}
        if not self.config.chat_template:
            return Problem(index=index, prompt=f"{a}{op}{b}=", answer=str(result), meta=meta)
        question = self.config.chat_prompt.format(a=a, op=op, b=b)
        messages = [{"role": "user", "content": question}]
        if self.config.system is not None:
            messages.insert(0, {"role": "system", "content": self.config.system})
        return Problem(index=index, prompt=question, answer=str(result), meta=meta,
                       messages=tuple(messages))

    # --- the Task interface ---

    def train_problem(self, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"train index must be >= 0, got {index}")
        # A fresh generator per index keeps this a pure function of (config, index): resumable.
        rng = random.Random(f"arithmetic:{self.config.seed}:{index}")
        for _ in range(MAX_TRAIN_REDRAWS):
            p = self._draw(rng)
            if not self._held_out(p):
                return self._problem(index, p)
        raise UserError(
            f"arithmetic: eval_fraction={self.config.eval_fraction} leaves no training problems; "
            "lower it"
        )

    def eval_problems(self) -> list[Problem]:
        if self._eval is None:
            size = self.a_range * self.b_range * len(self.ops)
            small = size <= ENUMERATE_LIMIT
            held = self._enumerate_held_out() if small else self._sample_held_out()
            self._eval = [self._problem(i, p) for i, p in enumerate(held)]
        return list(self._eval)

    def _enumerate_held_out(self) -> list[tuple[int, str, int]]:
        space = {
            self._canonical(a, op, b)
            for op in self.ops
            for a in range(self.a_range)
            for b in range(self.b_range)
        }
        held = [p for p in space if self._held_out(p)]
        # Sorting by hash: a deterministic order whose prefix is a uniform sample of the held out.
        held.sort(key=lambda p: (self._hash_fraction(p), p))
        return held[: self.config.eval_size]

    def _sample_held_out(self) -> list[tuple[int, str, int]]:
        rng = random.Random(f"arithmetic-eval:{self.config.seed}")
        found: dict[tuple[int, str, int], None] = {}  # insertion-ordered set
        for _ in range(MAX_EVAL_DRAWS):
            p = self._draw(rng)
            if self._held_out(p):
                found[p] = None
                if len(found) == self.config.eval_size:
                    return list(found)
        raise UserError(
            f"arithmetic: eval_fraction={self.config.eval_fraction} is too small to find "
            f"{self.config.eval_size} held-out problems; raise it"
        )

    def reward(self, problem: Problem, completion: str) -> float:
        if self.config.chat_template:
            # An instruct model may restate the question ("12 + 7 = 19"): its last number counts.
            numbers = _ANY_INT.findall(completion)
            value = numbers[-1].replace(",", "") if numbers else None
        else:
            # The completion continues "12+7=": read its leading integer and ignore what follows.
            match = _LEADING_INT.match(completion.strip())
            value = match.group() if match is not None else None
        return 1.0 if value not in (None, "-") and int(value) == int(problem.answer) else 0.0
