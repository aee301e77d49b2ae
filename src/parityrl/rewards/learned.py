"""The run's learned rewards together: one group's scores, what failed, and the reward models'
engine-vs-reference check.

    learned = await LearnedRewards.start(config, resolve=resolve_model, tokenizer_of=load_tokenizer)
    scores, judge_answers = await learned.score(problem, completions)  # {"judge": [...], ...}
    reward = task_weight * verified + learned.combine(scores)

A reward engine that dies is restarted (at most `max_restarts` times in the run) and the group
scored again: nothing was kept of the failed call, so no group is lost or scored twice. A judge
that takes longer than its timeout, or (with on_unparseable=reject_group) answers what its
parser cannot read, rejects the group: `RewardRejected`, counted by the actor.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

from parityrl.rewards.config import RewardsConfig
from parityrl.rewards.judge import Judge, parse_answer
from parityrl.rewards.reward_model import ReferenceRewardModel, RewardModel
from parityrl.tasks.base import Problem


class RewardRejected(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class RewardEnginesDied(RuntimeError):
    """A reward engine died more often than `rewards.max_restarts` allows."""


def combine(config: RewardsConfig, scores: dict[str, list[float]]) -> list[float]:
    """Σ weight × score over the learned sources (`LearnedRewards.score`'s), per completion."""
    weights = {f"reward_model_{i}": m.weight for i, m in enumerate(config.models)}
    if config.judge is not None:
        weights["judge"] = config.judge.weight
    n = len(next(iter(scores.values())))
    return [sum(weights[name] * values[j] for name, values in scores.items()) for j in range(n)]


class LearnedRewards:
    def __init__(self, config: RewardsConfig, models: list[RewardModel],
                 judge: Judge | None) -> None:
        self.config = config
        self.models = models
        self.judge = judge
        self.restarts = 0
        self.judge_unparseable = 0
        self.groups_scored = 0
        self.last_check: dict[str, float] = {}
        self._references: dict[int, ReferenceRewardModel] = {}  # model index → transformers
        self._restarting = asyncio.Lock()  # one restart of a dead engine at a time
        self._loading_reference = asyncio.Lock()

    @classmethod
    async def start(cls, config: RewardsConfig, resolve: Callable[[str], Path],
                    tokenizer_of: Callable[[Path], object]) -> "LearnedRewards":
        """`resolve`: a model spec → its folder (builtin names built on first use);
        `tokenizer_of`: a folder → its tokenizer (both from the models layer)."""
        models: list[RewardModel] = []
        judge = None
        try:
            for m in config.models:
                folder = resolve(m.path)
                models.append(await RewardModel.start(m, folder, tokenizer_of(folder)))
            if config.judge is not None:
                folder = resolve(config.judge.model)
                judge = await Judge.start(config.judge, folder, tokenizer_of(folder))
        except BaseException:
            await asyncio.gather(*[m.close() for m in models], return_exceptions=True)
            raise
        return cls(config, models, judge)

    # -- one group -------------------------------------------------------------------------------
    async def score(self, problem: Problem, completions: list[str]
                    ) -> tuple[dict[str, list[float]], list[str] | None]:
        """Each learned source's scores of the group, by name ("reward_model_0", "judge"), and
        the judge's answers (None without a judge)."""
        out: dict[str, list[float]] = {}
        answers = None
        for i, model in enumerate(self.models):
            sequences = model.sequences(problem, completions)
            out[f"reward_model_{i}"] = await self._with_restart(model, model.score_ids, sequences)
            if model.engine is not None and self._check_due(model):
                await self._check(i, sequences, out[f"reward_model_{i}"])
        if self.judge is not None:
            out["judge"], answers = await self._judge(problem, completions)
        self.groups_scored += 1
        return out, answers

    def combine(self, scores: dict[str, list[float]]) -> list[float]:
        return combine(self.config, scores)

    async def _with_restart(self, server, call, *args):
        """`call(*args)`; if `server`'s engine died meanwhile, restart it and call again. Groups
        scored concurrently all meet the same death: one restarts the engine (under the lock),
        the others find it restarted (`server.starts` moved on) and call again."""
        while True:
            starts = server.starts
            try:
                return await call(*args)
            except Exception:
                if server.starts == starts and not server.dead:
                    raise
            async with self._restarting:
                if server.starts != starts:
                    continue  # another group restarted it
                if self.restarts >= self.config.max_restarts:
                    raise RewardEnginesDied(
                        f"a reward engine died after {self.restarts} restarts "
                        f"(rewards.max_restarts={self.config.max_restarts})")
                self.restarts += 1
                await server.restart()

    async def _judge(self, problem: Problem, completions: list[str]
                     ) -> tuple[list[float], list[str]]:
        judge = self.judge
        try:
            answers = await asyncio.wait_for(
                self._with_restart(judge, judge.answers, problem, completions),
                judge.config.timeout_s)
        except asyncio.TimeoutError:
            raise RewardRejected("judge_timeout", f"the judge took more than "
                                                  f"{judge.config.timeout_s} s") from None
        verdicts = [parse_answer(judge.config.parser, a) for a in answers]
        unparseable = sum(v is None for v in verdicts)
        self.judge_unparseable += unparseable
        if unparseable and judge.config.on_unparseable == "reject_group":
            raise RewardRejected("judge_unparseable", f"the judge's answer to {unparseable} of "
                                                      f"{len(verdicts)} completions is not one "
                                                      "its parser reads")
        return [judge.config.unparseable_score if v is None else v for v in verdicts], answers

    # -- the engine-vs-reference check -----------------------------------------------------------
    def _check_due(self, model: RewardModel) -> bool:
        every = model.config.check_every
        return bool(every) and self.groups_scored % every == 0

    async def _check(self, i: int, sequences: list[list[int]], served: list[float]) -> None:
        """A sample of the group scored by transformers (float32) too: the largest difference."""
        model = self.models[i]
        async with self._loading_reference:  # loaded once, by the first group to be checked
            if i not in self._references:
                self._references[i] = await asyncio.to_thread(ReferenceRewardModel, model.folder,
                                                              "float32")
        sample = sequences[: model.config.check_samples]
        reference = await asyncio.to_thread(self._references[i].score, sample, model.activation)
        self.last_check[f"reward/model_{i}_vs_reference_max_abs"] = max(
            abs(a - b) for a, b in zip(served, reference))

    # -- the run ---------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        return {"reward/engine_restarts": float(self.restarts),
                **({"reward/judge_unparseable": float(self.judge_unparseable)}
                   if self.judge is not None else {}),
                **self.last_check}

    def resolved_settings(self) -> dict:
        return {"task_weight": self.config.task_weight,
                "reward_models": [m.resolved_settings() for m in self.models],
                "judge": None if self.judge is None else self.judge.resolved_settings()}

    async def close(self) -> None:
        servers = [*self.models, *([self.judge] if self.judge is not None else [])]
        await asyncio.gather(*[s.close() for s in servers], return_exceptions=True)
