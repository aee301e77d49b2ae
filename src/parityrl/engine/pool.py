"""Several engines behind the one-engine interface the actor, evaluation and pipeline use.

    pool = await EnginePool.start(settings, engines=2)     # engine.weight_transport: gloo
    rollouts = await pool.generate(prompt_ids, sampling, n=8)   # on the least-loaded engine
    reports = await pool.update_all(state_dict, version=step)   # one broadcast, every engine

Updates go to every engine in one gloo group (rank 0 the trainer, engine i at rank 1 + i): one
broadcast, all engines paused and resumed together, each one's digests checked, the same version
on all. LoRA adapters go to every engine as PEFT folders instead (`update_adapter`). Requests go
to the engine with the fewest groups in flight. On a CPU host each engine's
worker gets a core of its own (`VLLM_CPU_OMP_THREADS_BIND`), or vLLM would bind them all to the
same one.
"""

from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable

import torch

from parityrl.engine.engine import (PreemptionCounter, RolloutEngine, UpdateReport, generate_each,
                                    join_gloo_group, push_over_gloo)
from parityrl.engine.settings import EngineSettings
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig


class EnginePool:
    def __init__(self, engines: list, transfer, start_one) -> None:
        self.engines = engines
        self._transfer = transfer
        self._start_one = start_one  # starts a replacement for a dead engine
        self._in_flight = [0] * len(engines)
        self.served = [0] * len(engines)  # groups each engine was given

    @classmethod
    async def start(cls, settings: EngineSettings, engines: int,
                    start_engine: Callable[[EngineSettings], Awaitable] | None = None
                    ) -> "EnginePool":
        """`engines` engines and one transfer group. `start_engine(settings)` starts one (default:
        a RolloutEngine in this process; cluster/engine_role.py: one in a Ray actor, and then
        they start side by side)."""
        adapters_only = bool(settings.max_lora_rank)
        if not adapters_only and settings.weight_transport != "gloo":
            raise ValueError("several engines take their updates over gloo "
                             "(engine.weight_transport: gloo)")
        cores = sorted(os.sched_getaffinity(0))
        own = [settings if settings.cpu_threads_bind is not None else
               settings.model_copy(update={"cpu_threads_bind": str(cores[i % len(cores)])})
               for i in range(engines)]
        # A LoRA pool's engines keep the base from the model folder and take adapters as PEFT
        # folders each writes for itself: no transfer group, any engine source.
        start_one = start_engine or (_start_from_source if adapters_only else _start_local)
        started = await _start_all(start_one, own)
        if adapters_only:
            return cls(started, None, start_one)
        try:
            transfer = await join_gloo_group(started)
        except BaseException:
            await asyncio.gather(*(e.close() for e in started), return_exceptions=True)
            raise
        return cls(started, transfer, start_one)

    async def replace_dead(self, weights: dict[str, torch.Tensor], version: int,
                           lora: dict | None = None) -> list[int]:
        """Engines that died replaced by new ones with the same settings, one transfer group
        formed again over all of them, and `weights` pushed to all at `version` (the survivors
        keep their requests in flight); with `lora`, `weights` is the adapter and goes to the new
        engines only. Returns the indices replaced (none: nobody is dead)."""
        alive = await asyncio.gather(*(e.alive() for e in self.engines))
        dead = [i for i, ok in enumerate(alive) if not ok]
        if not dead:
            return []
        await asyncio.gather(*(self.engines[i].close() for i in dead), return_exceptions=True)
        fresh = await _start_all(self._start_one, [self.engines[i].settings for i in dead])
        for i, engine in zip(dead, fresh):
            self.engines[i] = engine
        if lora is not None:
            await asyncio.gather(*(e.update_adapter(weights, lora, version=version)
                                   for e in fresh))
            return dead
        self._transfer = await join_gloo_group(self.engines)
        await self.update_all(weights, version=version)
        return dead

    # -- the one-engine interface -----------------------------------------------------------------
    @property
    def preemption_counter(self) -> PreemptionCounter | None:
        """All engines' preemptions so far, summed (None without count_preemptions)."""
        counters = [e.preemption_counter for e in self.engines]
        if counters[0] is None:
            return None
        total = PreemptionCounter()
        total.preemptions = sum(c.preemptions for c in counters)
        return total

    def resolved_settings(self) -> dict:
        """The first engine's settings, and how many engines run them."""
        return self.engines[0].resolved_settings() | {"engines": len(self.engines)}

    async def generate(self, prompt_ids: list[int], sampling: SamplingConfig, *, n: int = 1,
                       seed: int | None = None, group_id: int = 0) -> list[Rollout]:
        i = min(range(len(self.engines)), key=self._in_flight.__getitem__)
        self._in_flight[i] += 1
        self.served[i] += 1
        try:
            return await self.engines[i].generate(prompt_ids, sampling, n=n, seed=seed,
                                                  group_id=group_id)
        finally:
            self._in_flight[i] -= 1

    async def generate_many(self, prompts: list[list[int]], sampling: SamplingConfig, *,
                            n: int = 1, seed: int | None = None) -> list[Rollout]:
        return await generate_each(self.generate, prompts, sampling, n=n, seed=seed)

    async def update_weights(self, state_dict: dict[str, torch.Tensor], *,
                             version: int | None = None, verify: bool = True,
                             skip: set[str] = frozenset(),
                             reset_prefix_cache: bool = True) -> UpdateReport:
        """Every engine updated (see `update_all`); the first engine's report, which counts the
        engines whose digests matched (`engines_verified`)."""
        return (await self.update_all(state_dict, version=version, verify=verify, skip=skip,
                                      reset_prefix_cache=reset_prefix_cache))[0]

    async def update_all(self, state_dict: dict[str, torch.Tensor], *, version: int | None = None,
                         verify: bool = True, skip: set[str] = frozenset(),
                         reset_prefix_cache: bool = True) -> list[UpdateReport]:
        return await push_over_gloo(self.engines, self._transfer, state_dict, version=version,
                                    verify=verify, skip=skip,
                                    reset_prefix_cache=reset_prefix_cache)

    async def update_adapter(self, tensors: dict[str, torch.Tensor], lora: dict, *,
                             version: int | None = None, verify: bool = True,
                             **options) -> UpdateReport:
        """The adapter into every engine at once, each under its own pause(keep) → load →
        digests → prefix-cache reset → version → resume (RolloutEngine.update_adapter): a
        request in flight on one engine never waits for another's load. Every engine's slots are
        digested against the same prediction, so all hold the same adapter when this returns.
        The first report, counting the engines whose digests matched; the longest pause."""
        reports = await asyncio.gather(*(e.update_adapter(tensors, lora, version=version,
                                                          verify=verify, **options)
                                         for e in self.engines))
        first = reports[0]
        first.engines_verified = sum(r.engines_verified for r in reports)
        first.pause_seconds = max(r.pause_seconds for r in reports)
        return first

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.engines), return_exceptions=True)
        self._transfer = None


async def _start_local(settings: EngineSettings) -> RolloutEngine:
    return await RolloutEngine.start(settings, join_transfer=False)


async def _start_from_source(settings: EngineSettings):
    """A LoRA pool's engine from wherever `start_engine` gets engines (engine/source.py)."""
    from parityrl.engine.source import start_engine

    return await start_engine(settings)


async def _start_all(start_one, settings: list[EngineSettings]) -> list:
    """One engine per settings; all stopped again if one fails. In this process they start one
    after the other (each start sets this process's environment for vLLM's spawn); elsewhere
    (Ray actors) side by side."""
    started: list = []
    try:
        if start_one not in (_start_local, _start_from_source):
            results = await asyncio.gather(*(start_one(one) for one in settings),
                                           return_exceptions=True)
            started = [r for r in results if not isinstance(r, BaseException)]
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        else:
            for one in settings:
                started.append(await start_one(one))
    except BaseException:
        await asyncio.gather(*(e.close() for e in started), return_exceptions=True)
        raise
    return started
