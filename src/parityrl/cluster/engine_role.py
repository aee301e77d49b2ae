"""An engine in a Ray actor, and its stand-in on the driver.

    pool = await EnginePool.start(settings, engines=2, start_engine=ray_engine_starter(resources))

`EngineRole` runs in the actor: a `RolloutEngine` (vLLM's AsyncLLM, the worker extension) that
joins the pool's gloo group instead of one of its own. `RayEngine` is what the driver's actor,
evaluation and EnginePool talk to: the engine interface (engine/interface.py), and an update's
steps each one a Ray call, so weights/update.py `push` drives engines in other processes (or on
other nodes) exactly as local ones: pause with mode="keep", one broadcast, digests, prefix-cache
reset, version, resume.
"""

from __future__ import annotations

import asyncio

from parityrl.cluster.ray_cluster import start_actor, where
from parityrl.config import RoleResources
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.engine.engine import (
    PreemptionCounter,
    RolloutEngine,
    generate_each,
    join_gloo_group,
)
from parityrl.engine.settings import EngineSettings
from parityrl.weights.shm_file import checkpoint_tensor_names
from parityrl.weights.update import UpdateReport, WeightsPayload, push

# The RolloutEngine calls a driver may make on the actor's engine (one update's steps).
UPDATE_CALLS = frozenset({"pause", "worker_call", "after_load", "resume", "transfer_init",
                          "transfer_start", "transfer_update", "transfer_finish"})


class EngineRole:
    """Inside the Ray actor (an async actor: calls run concurrently on its event loop)."""

    async def start(self, settings: EngineSettings) -> dict:
        self.engine = await RolloutEngine.start(settings, join_transfer=False)
        return {"resolved": self.engine.resolved_settings(), "where": where()}

    async def generate(self, prompt_ids: list[int], sampling: SamplingConfig, n: int,
                       seed: int | None, group_id: int) -> tuple[list[Rollout], int | None]:
        rollouts = await self.engine.generate(prompt_ids, sampling, n=n, seed=seed,
                                              group_id=group_id)
        counter = self.engine.preemption_counter
        return rollouts, None if counter is None else counter.preemptions

    async def alive(self) -> bool:
        return await self.engine.alive()

    async def update_adapter(self, tensors: dict, lora: dict, version: int | None,
                             options: dict) -> UpdateReport:
        """A LoRA adapter in one call: the PEFT folder is written here, on the engine's node."""
        return await self.engine.update_adapter(tensors, lora, version=version, **options)

    async def call(self, name: str, *args):
        if name not in UPDATE_CALLS:
            raise ValueError(f"not an engine update call: {name}")
        return await getattr(self.engine, name)(*args)

    async def close(self) -> None:
        await self.engine.close()


class RayEngine:
    """The driver's stand-in for one engine actor (see the module docstring)."""

    def __init__(self, handle, settings: EngineSettings, started: dict) -> None:
        self.handle = handle
        self.settings = settings
        self.where = started["where"]
        self._resolved = started["resolved"]
        self.version = 0
        self.update_lock = asyncio.Lock()
        self.preemption_counter = PreemptionCounter() if settings.count_preemptions else None
        self.expected_names = checkpoint_tensor_names(settings.model)
        self.transport = None  # a gloo group of its own (start); in a pool, the pool's

    @classmethod
    async def start(cls, settings: EngineSettings, resources: RoleResources, *,
                    join_transfer: bool = False) -> "RayEngine":
        """An engine actor; with `join_transfer`, in a gloo group of its own (alone, not in an
        EnginePool, which makes one group for all its engines)."""
        # A dead engine is replaced by the run: a new actor, the current weights.
        handle, started = await start_actor(EngineRole, resources, settings)
        engine = cls(handle, settings, started)
        if join_transfer:
            try:
                engine.transport = await join_gloo_group([engine])
            except BaseException:
                await engine.close()
                raise
        return engine

    def resolved_settings(self) -> dict:
        return self._resolved

    async def alive(self) -> bool:
        """The actor answers and its engine runs."""
        import ray

        try:
            return await asyncio.wait_for(self.handle.alive.remote(), timeout=30)
        except (ray.exceptions.RayError, asyncio.TimeoutError):
            return False

    async def generate(self, prompt_ids: list[int], sampling: SamplingConfig, *, n: int = 1,
                       seed: int | None = None, group_id: int = 0) -> list[Rollout]:
        rollouts, preemptions = await self.handle.generate.remote(list(prompt_ids), sampling, n,
                                                                  seed, group_id)
        if self.preemption_counter is not None and preemptions is not None:
            self.preemption_counter.preemptions = max(self.preemption_counter.preemptions,
                                                      preemptions)
        return rollouts

    async def generate_many(self, prompts: list[list[int]], sampling: SamplingConfig, *,
                            n: int = 1, seed: int | None = None) -> list[Rollout]:
        return await generate_each(self.generate, prompts, sampling, n=n, seed=seed)

    async def update_weights(self, state_dict: dict, *, version: int | None = None,
                             verify: bool = True, skip: set[str] = frozenset(),
                             reset_prefix_cache: bool = True) -> UpdateReport:
        """Alone (`join_transfer`): one update over its own gloo group."""
        if self.transport is None:
            raise RuntimeError("this engine actor takes its updates from its pool's group")
        (report,) = await push([self], self.transport, WeightsPayload(state_dict, skip),
                               version=version, verify=verify,
                               reset_prefix_cache=reset_prefix_cache)
        return report

    # -- an update's steps, run in the actor ------------------------------------------------------
    async def pause(self) -> None:
        await self.handle.call.remote("pause")

    async def worker_call(self, method: str, *args):
        return await self.handle.call.remote("worker_call", method, *args)

    async def after_load(self, version: int | None, reset_prefix_cache: bool) -> None:
        await self.handle.call.remote("after_load", version, reset_prefix_cache)
        self.version = self.version + 1 if version is None else version

    async def resume(self) -> None:
        await self.handle.call.remote("resume")

    async def update_adapter(self, tensors: dict, lora: dict, *, version: int | None = None,
                             **options) -> UpdateReport:
        """RolloutEngine.update_adapter in the actor (the adapter is megabytes: Ray carries it)."""
        async with self.update_lock:
            report = await self.handle.update_adapter.remote(dict(tensors), lora, version,
                                                             options)
            self.version = report.version
        return report

    async def transfer_init(self, init_info: dict) -> None:
        await self.handle.call.remote("transfer_init", init_info)

    async def transfer_start(self) -> None:
        await self.handle.call.remote("transfer_start")

    async def transfer_update(self, update_info: dict) -> None:
        await self.handle.call.remote("transfer_update", update_info)

    async def transfer_finish(self, weight_version: str | None = None) -> None:
        await self.handle.call.remote("transfer_finish", weight_version)

    async def close(self) -> None:
        """Stop the engine in the actor (a dead actor is simply gone), then the actor."""
        import ray

        self.transport = None
        try:
            await asyncio.wait_for(self.handle.close.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - dead or stuck: the kill below ends it either way
            pass
        ray.kill(self.handle)


def ray_engine_starter(resources: RoleResources):
    """`EnginePool.start(..., start_engine=...)`: each engine a Ray actor."""

    async def start(settings: EngineSettings) -> RayEngine:
        return await RayEngine.start(settings, resources)

    return start
