"""The actor: problems → engine → scored rollout groups → stream.

In async mode it keeps generating while the trainer trains, bounded by a budget of outstanding
groups (in flight + queued) so that samples do not grow staler than `max_lag` allows. In sync mode
the pipeline asks it for exactly one batch at a time.
"""

from __future__ import annotations

import asyncio
import time

from parityrl.engine.engine import RolloutEngine
from parityrl.rollouts.stream import Group, RolloutStream
from parityrl.rollouts.types import Rollout
from parityrl.sampling import SamplingConfig
from parityrl.tasks.base import Task


class Actor:
    def __init__(self, engine: RolloutEngine, task: Task, tokenizer, sampling: SamplingConfig,
                 group_size: int, seed: int, start_index: int = 0) -> None:
        self.engine = engine
        self.task = task
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.group_size = group_size
        self.seed = seed
        self.next_index = start_index  # data position: the next training problem to start
        self.engine_busy_seconds = 0.0  # wall time with at least one group in flight
        self._in_flight = 0
        self._busy_since: float | None = None

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def decode(self, rollout: Rollout) -> str:
        return self.tokenizer.decode(rollout.completion_ids, skip_special_tokens=True)

    async def generate_group(self, index: int) -> Group:
        problem = self.task.train_problem(index)
        self._enter()
        start = time.perf_counter()
        try:
            group = await self.engine.generate(
                self.encode(problem.prompt), self.sampling, n=self.group_size,
                seed=self.seed * 1_000_003 + index * self.group_size, group_id=index)
        finally:
            self._leave()
        seconds = time.perf_counter() - start
        for rollout in group:
            rollout.reward = float(self.task.reward(problem, self.decode(rollout)))
            rollout.meta.update(problem_index=index, prompt=problem.prompt, answer=problem.answer,
                                generate_seconds=seconds)
        return group

    async def generate_batch(self, num_groups: int) -> list[Group]:
        """Sync mode: the next `num_groups` problems, generated together."""
        indices = range(self.next_index, self.next_index + num_groups)
        self.next_index += num_groups
        return list(await asyncio.gather(*[self.generate_group(i) for i in indices]))

    async def run(self, stream: RolloutStream, budget: asyncio.Semaphore) -> None:
        """Async mode: generate forever; each group holds one `budget` slot until trained on."""
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                await budget.acquire()
                index = self.next_index
                self.next_index += 1
                task = asyncio.create_task(self._generate_into(index, stream))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()

    async def _generate_into(self, index: int, stream: RolloutStream) -> None:
        await stream.put(await self.generate_group(index))

    def _enter(self) -> None:
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._busy_since is not None:
            self.engine_busy_seconds += time.perf_counter() - self._busy_since
            self._busy_since = None

    def busy_seconds_now(self) -> float:
        extra = time.perf_counter() - self._busy_since if self._busy_since is not None else 0.0
        return self.engine_busy_seconds + extra
