"""The learned rewards in a Ray actor (`cluster.backend: ray`), and their stand-in on the driver.

    learned = await RayLearnedRewards.start(config.rewards, config.cluster.resources.rewards)

`RewardRole` runs in the actor: the run's `LearnedRewards` (its reward-model and judge engines,
restarted there when they die). `RayLearnedRewards` answers the actor's calls as
`LearnedRewards` does: `score`, `combine`, `metrics`, `resolved_settings`, `close`. A judge's
timeout or unparseable answer arrives as the same `RewardRejected` (Ray re-raises the actor's
exception as an instance of its class).
"""

from __future__ import annotations

from parityrl.cluster.ray_cluster import start_actor, where
from parityrl.config import RoleResources
from parityrl.models.builtin import resolve_model
from parityrl.models.tokenizer import load_tokenizer
from parityrl.rewards.config import RewardsConfig
from parityrl.rewards.learned import LearnedRewards, combine
from parityrl.tasks.base import Problem


class RewardRole:
    """Inside the Ray actor (an async actor: groups are scored concurrently)."""

    async def start(self, config: RewardsConfig) -> dict:
        self.learned = await LearnedRewards.start(config, resolve_model, load_tokenizer)
        return {"resolved": self.learned.resolved_settings(), "where": where()}

    async def score(self, problem: Problem, completions: list[str]) -> tuple[tuple, dict]:
        return await self.learned.score(problem, completions), self.learned.metrics()

    async def metrics(self) -> dict:
        return self.learned.metrics()

    async def close(self) -> None:
        await self.learned.close()


class RayLearnedRewards:
    """The driver's stand-in for the rewards actor."""

    def __init__(self, handle, config: RewardsConfig, started: dict) -> None:
        self.handle = handle
        self.config = config
        self.where = started["where"]
        self._resolved = started["resolved"]
        self._metrics: dict = {}

    @classmethod
    async def start(cls, config: RewardsConfig, resources: RoleResources) -> "RayLearnedRewards":
        handle, started = await start_actor(RewardRole, resources, config)
        return cls(handle, config, started)

    async def score(self, problem: Problem, completions: list[str]
                    ) -> tuple[dict[str, list[float]], list[str] | None]:
        scored, self._metrics = await self.handle.score.remote(problem, completions)
        return scored

    def combine(self, scores: dict[str, list[float]]) -> list[float]:
        return combine(self.config, scores)

    def metrics(self) -> dict:
        return self._metrics

    def resolved_settings(self) -> dict:
        return self._resolved | {"where": self.where}

    async def close(self) -> None:
        import ray

        try:
            await self.handle.close.remote()
        finally:
            ray.kill(self.handle)
