"""Held-out evaluation on the engine: greedy accuracy on the task's eval problems."""

from __future__ import annotations

import asyncio

from parityrl.sampling import SamplingConfig
from parityrl.tasks.base import Problem, Task
from parityrl.tasks.prompts import encode_problem


async def greedy_accuracy(engine, task: Task, tokenizer, problems: list[Problem],
                          max_tokens: int) -> float:
    """Fraction of `problems` whose greedy completion gets reward 1."""
    eos = tokenizer.eos_token_id
    sampling = SamplingConfig(temperature=0.0, max_tokens=max_tokens,
                              stop_token_ids=(eos,) if eos is not None else ())

    async def solve(problem: Problem) -> float:
        ids = encode_problem(tokenizer, problem)
        (rollout,) = await engine.generate(ids, sampling)
        text = tokenizer.decode(rollout.completion_ids, skip_special_tokens=True)
        return float(task.reward(problem, text) >= 1.0)

    scores = await asyncio.gather(*[solve(p) for p in problems])
    return sum(scores) / max(len(scores), 1)
