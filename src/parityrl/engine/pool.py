"""A run's engines: one or several behind the one engine interface (engine/interface.py).

    pool = await EnginePool.start(settings, engines=2)     # engine.weight_transport: gloo
    rollouts = await pool.generate(prompt_ids, sampling, n=8)   # on the least-loaded engine
    reports = await pool.update_all(state_dict, version=step)   # one broadcast, every engine

Several engines, or engines in Ray actors, form one gloo group (rank 0 the trainer, engine i at
rank 1 + i): one broadcast, all paused and resumed together, each one's digests checked, the same
version on all (weights/update.py). A pool of one engine of this process (`start_engine`: the
test suite's shared engines stand in there) leaves updates to that engine's own transport. LoRA
adapters go to every engine as PEFT folders each writes for itself. Requests go to the engine
with the fewest groups in flight. On a CPU host each engine's worker gets a core of its own
(`VLLM_CPU_OMP_THREADS_BIND`), or vLLM would bind them all to the same one.

A dead engine is replaced by a new one with the same settings (`replace`), holding the run's
current weights and version; the others keep their requests in flight.
"""

from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable

import torch

from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.engine.engine import (PreemptionCounter, RolloutEngine, UpdateReport, generate_each,
                                    join_gloo_group)
from parityrl.engine.interface import Engine
from parityrl.engine.settings import EngineSettings
from parityrl.engine.source import start_engine
from parityrl.weights.update import WeightsPayload, push

StartEngine = Callable[[EngineSettings], Awaitable[Engine]]


class EnginePool:
    def __init__(self, engines: list, transport, start_one: StartEngine, several: bool) -> None:
        self.engines = engines
        self._transport = transport  # the group's (gloo); None: each engine updates itself
        self._start_one = start_one  # starts a replacement for a dead engine
        self._in_flight = [0] * len(engines)
        self.served = [0] * len(engines)  # requests each engine was given (evaluation's too)
        self._several = several  # report per-engine counts and how many engines

    @property
    def several(self) -> bool:
        """A pool proper: several engines, or engine actors (even one): it reports each engine's
        share and replaces only the engines that died."""
        return self._several

    @property
    def settings(self) -> EngineSettings:
        return self.engines[0].settings

    @property
    def version(self) -> int:
        return self.engines[0].version

    @classmethod
    async def start(cls, settings: EngineSettings, engines: int = 1,
                    start_engine: StartEngine | None = None) -> "EnginePool":
        """`engines` engines. `start_engine(settings)` starts one (cluster/engine_role.py: in a
        Ray actor; then they start side by side, and form one transfer group). Without it, one
        engine comes from engine/source.py `start_engine` and updates itself; several start in
        this process and form one transfer group."""
        several = start_engine is not None or engines > 1  # a pool proper (Ray: even of one)
        grouped = several and not settings.max_lora_rank
        if grouped and settings.weight_transport != "gloo":
            raise ValueError("several engines take their updates over gloo "
                             "(engine.weight_transport: gloo)")
        cores = sorted(os.sched_getaffinity(0))
        own = [settings if settings.cpu_threads_bind is not None or not several else
               settings.model_copy(update={"cpu_threads_bind": str(cores[i % len(cores)])})
               for i in range(engines)]
        # A group's engines join the pool's group, not one of their own; the others come from
        # wherever `start_engine` gets engines (a LoRA pool's write their adapter folders).
        start_one = start_engine or (_start_in_group if grouped else _start_from_source)
        started = await _start_all(start_one, own)
        transport = None
        if grouped:
            try:
                transport = await join_gloo_group(started)
            except BaseException:
                await asyncio.gather(*(e.close() for e in started), return_exceptions=True)
                raise
        return cls(started, transport, start_one, several)

    # -- replacing dead engines -------------------------------------------------------------------
    async def dead(self) -> list[int]:
        """The indices of the engines that no longer answer."""
        alive = await asyncio.gather(*(e.alive() for e in self.engines))
        return [i for i, ok in enumerate(alive) if not ok]

    async def replace(self, indices: list[int], weights: dict[str, torch.Tensor], version: int,
                      lora: dict | None = None) -> None:
        """Engines `indices` (dead, or stuck) closed and replaced by new ones with the same
        settings, holding `weights` at `version`. In a group, the group forms again over all
        engines and the weights go to all (the others keep their requests in flight); with
        `lora`, `weights` is the adapter and goes to the new engines only."""
        await asyncio.gather(*(self.engines[i].close() for i in indices), return_exceptions=True)
        fresh = await _start_all(self._start_one, [self.engines[i].settings for i in indices])
        for i, engine in zip(indices, fresh):
            self.engines[i] = engine
        if lora is not None:
            await asyncio.gather(*(e.update_adapter(weights, lora, version=version)
                                   for e in fresh))
        elif self._transport is None:
            await asyncio.gather(*(e.update_weights(weights, version=version) for e in fresh))
        else:
            self._transport = await join_gloo_group(self.engines)
            await self.update_all(weights, version=version)

    # -- the engine interface ---------------------------------------------------------------------
    @property
    def preemption_counter(self) -> PreemptionCounter | None:
        """All engines' preemptions so far, summed (None without count_preemptions)."""
        counters = [e.preemption_counter for e in self.engines]
        if counters[0] is None:
            return None
        total = PreemptionCounter()
        total.preemptions = sum(c.preemptions for c in counters)
        return total

    def metrics(self) -> dict[str, float]:
        """Requests the engines preempted (count_preemptions; since they started) and, with
        several engines or Ray, the groups each one generated so far."""
        counter = self.preemption_counter
        return {**({"engine/preemptions": float(counter.preemptions)} if counter else {}),
                **({f"engine/groups_served_{i}": float(n) for i, n in enumerate(self.served)}
                   if self._several else {})}

    def resolved_settings(self) -> dict:
        """The first engine's settings, and how many engines run them (several)."""
        first = self.engines[0].resolved_settings()
        return first | {"engines": len(self.engines)} if self._several else first

    async def alive(self) -> bool:
        return not await self.dead()

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
        options = dict(version=version, verify=verify, reset_prefix_cache=reset_prefix_cache)
        if self._transport is None:
            return list(await asyncio.gather(*(e.update_weights(state_dict, skip=skip, **options)
                                               for e in self.engines)))
        return await push(self.engines, self._transport, WeightsPayload(state_dict, skip),
                          **options)

    async def update_adapter(self, tensors: dict[str, torch.Tensor], lora: dict, *,
                             version: int | None = None, verify: bool = True,
                             **options) -> UpdateReport:
        """The adapter into every engine at once, each under its own update (a request in flight
        on one engine never waits for another's load). Every engine's slots are digested against
        the same prediction, so all hold the same adapter when this returns. The first report,
        counting the engines whose digests matched; the longest pause."""
        reports = await asyncio.gather(*(e.update_adapter(tensors, lora, version=version,
                                                          verify=verify, **options)
                                         for e in self.engines))
        first = reports[0]
        first.engines_verified = sum(r.engines_verified for r in reports)
        first.pause_seconds = max(r.pause_seconds for r in reports)
        return first

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.engines), return_exceptions=True)
        self._transport = None


async def _start_in_group(settings: EngineSettings) -> RolloutEngine:
    return await RolloutEngine.start(settings, join_transfer=False)


async def _start_from_source(settings: EngineSettings):
    return await start_engine(settings)


async def _start_all(start_one: StartEngine, settings: list[EngineSettings]) -> list:
    """One engine per settings; all stopped again if one fails. In this process they start one
    after the other (each start sets this process's environment for vLLM's spawn); elsewhere
    (Ray actors) side by side."""
    started: list = []
    try:
        if start_one not in (_start_in_group, _start_from_source):
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
