"""The rollout engine: vLLM V1 `AsyncLLM`, streaming, with in-place weight updates.

    engine = await RolloutEngine.start(EngineSettings(model="runs/tiny"))
    rollouts = await engine.generate(prompt_ids, sampling, n=4)   # behaviour logprobs + versions
    report = await engine.update_weights(model.state_dict())      # pause(keep) → load → resume

Behaviour logprobs are produced here: vLLM returns the logprob of each sampled token (in the mode
`EngineSettings.logprobs_mode` says), and every token is tagged with the policy version vLLM's
engine core had when it produced it (`CompletionOutput.weight_versions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parityrl.engine.routes import decode_routes, full_length_routes
from parityrl.engine.settings import EngineSettings, resolved_engine_settings
from parityrl.shm_guard import (ensure_guard, forget_in_resource_tracker,
                                held_by_this_process_tree, reclaim, shm_folder, temp_folder)
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.weights.digest import DigestCheck, compare_digests
from parityrl.weights.shm_file import SharedUpdateFile, checkpoint_tensor_names


@dataclass
class UpdateReport:
    version: int
    check: DigestCheck
    pause_seconds: float  # generation paused: pause, load, prefix-cache reset, resume
    write_seconds: float  # before the pause, trainer side: cast, hand-over file, digests
    load_seconds: float  # inside the worker: digests + vLLM's in-place reload (copy, repack)
    worker_digest_seconds: float  # the part of load_seconds spent on digests
    engines_verified: int = 1  # engines of this update whose digests matched the trainer's


# The trainer's adapter is LoRA id 1 (update_adapter); an exported folder served is id 2.
SERVED_ADAPTER_ID = 2
# An engine control call (pause, reload, resume) taking longer than this means a stuck engine.
CONTROL_TIMEOUT_S = 300.0
# vLLM waits 5 s for the engine-core process to exit on its own before killing it; on the CPU
# backend its worker never exits before the core is gone, so every close took 5.4 s (measured).
# The core has nothing left to flush once generation has stopped; its shared-memory segments are
# reclaimed below either way.
SHUTDOWN_GRACE_S = 0.5


class PreemptionCounter:
    """Requests vLLM's scheduler preempted, read from its per-step stats through a stat logger
    (vllm/v1/metrics/loggers.py StatLoggerBase; constructed by vLLM in this process)."""

    def __init__(self) -> None:
        self.preemptions = 0

    def stat_logger(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        counter = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx: int = 0) -> None:
                if iteration_stats is not None:
                    counter.preemptions += iteration_stats.num_preempted_reqs

            def log_engine_initialized(self) -> None:
                pass

        return _Logger(vllm_config, engine_index)


class WeightSyncError(RuntimeError):
    """The engine does not hold what the trainer sent."""


async def join_gloo_group(engines: list):
    """The trainer side of the gloo transport: rank 0 of one group with every engine's worker
    (engine i at rank 1 + i), created through vLLM's trainer factory while the engines join in
    their own calls. `engines`: RolloutEngines, or stand-ins for engines in other processes
    with the same update calls (cluster/engine_role.py)."""
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    from parityrl.weights import gloo

    gloo.register()
    address = engines[0].settings.weight_transport_address
    info = gloo.GlooTrainerInitInfo(master_address=address, master_port=gloo.free_port(address),
                                    world_size=1 + len(engines), rank_offset=1, rank=0)
    client = gloo.EngineGroupClient(engines, asyncio.get_running_loop(), CONTROL_TIMEOUT_S)
    return await asyncio.to_thread(WeightTransferTrainerFactory.trainer_init, info, client=client)


async def push_over_gloo(
    engines: list, transfer, state_dict: dict[str, torch.Tensor], *,
    version: int | None, verify: bool, skip: set[str], reset_prefix_cache: bool,
) -> list[UpdateReport]:
    """One update for every engine of a gloo group: all pause (`mode="keep"`), one broadcast
    reaches them all through vLLM's start → update → finish, each reports what it received,
    resets its prefix cache, takes the version, and all resume. The trainer's digests fill in as
    the tensors go out; each engine's are compared with them."""
    from contextlib import AsyncExitStack

    from parityrl.weights.gloo import StateDictSource

    source = StateDictSource(state_dict, getattr(torch, engines[0].settings.dtype), skip)
    async with AsyncExitStack() as locks:
        for engine in engines:
            await locks.enter_async_context(engine.update_lock)
        start = time.perf_counter()
        try:
            await asyncio.gather(*(e.pause() for e in engines))
            load_start = time.perf_counter()
            transfer.source = source
            await asyncio.wait_for(asyncio.to_thread(transfer.send_weights), CONTROL_TIMEOUT_S)
            loaded = time.perf_counter() - load_start
            results = await asyncio.gather(*(e.finish_transfer() for e in engines))
            await asyncio.gather(*(e.after_load(version, reset_prefix_cache) for e in engines))
        finally:
            resumed = await asyncio.gather(*(e.resume() for e in engines),
                                           return_exceptions=True)
            failed = [r for r in resumed if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
        pause_seconds = time.perf_counter() - start
    reports = [e.report(source.digests, result | {"load_seconds": loaded}, pause_seconds, 0.0)
               for e, result in zip(engines, results)]
    bad = [(i, r) for i, r in enumerate(reports) if not r.check.ok]
    for report in reports:
        report.engines_verified = len(reports) - len(bad)
    if verify and bad:
        if len(engines) == 1:
            raise WeightSyncError(bad[0][1].check.summary())
        raise WeightSyncError("; ".join(f"engine {i}: {r.check.summary()}" for i, r in bad))
    return reports


def update_report(version: int, expected_names: set[str], sent: dict, result: dict,
                  pause_seconds: float, write_seconds: float) -> UpdateReport:
    """What the engine's worker received (`result`) checked against what was `sent`."""
    check = compare_digests(sent, result["digests"], expected_names)
    return UpdateReport(version, check, pause_seconds, write_seconds, result["load_seconds"],
                        result["digest_seconds"], int(check.ok))


async def generate_each(generate, prompts: list[list[int]], sampling: SamplingConfig, *,
                        n: int, seed: int | None) -> list[Rollout]:
    """`generate` for every prompt at once, rollouts in prompt order; prompt i gets seeds
    seed + i*n … (see `RolloutEngine.generate_many`)."""
    groups = await asyncio.gather(*[
        generate(p, sampling, n=n, group_id=i, seed=None if seed is None else seed + i * n)
        for i, p in enumerate(prompts)
    ])
    return [r for group in groups for r in group]


# Where every engine start is appended as a JSON line (what started, how long it took), when set:
# the test suite counts the engines it started, in its own process and in those it spawned.
ENGINE_START_LOG = "PARITYRL_ENGINE_START_LOG"


@contextlib.contextmanager
def model_in_engine_core(vllm_config, executor: str):
    """With executor "uni", the engine-core process runs the model itself.

    vLLM's CPU platform always picks its mp executor: the engine core spawns a worker process,
    and each of the two imports vLLM in turn (~5 s each on these machines). Its reason is OpenMP:
    thread count and cores are environment variables a process must start with, so vLLM sets
    them for the worker it spawns (OMPProcessManager). Here the same manager sets them for the
    engine-core process while AsyncLLM spawns it: one process, the worker's threads and cores.
    """
    if executor != "uni" or vllm_config.parallel_config.world_size != 1:
        yield
        return
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    vllm_config.parallel_config.distributed_executor_backend = "uni"
    with OMPProcessManager(vllm_config).configure_omp_envs(rank=0, local_rank=0):
        yield


def log_engine_start(settings: EngineSettings, seconds: float) -> None:
    path = os.environ.get(ENGINE_START_LOG)
    if not path:
        return
    import json

    line = json.dumps({"pid": os.getpid(), "seconds": round(seconds, 2), "model": settings.model,
                       "dtype": settings.dtype, "settings": settings.model_dump(mode="json")})
    with open(path, "a") as f:  # one short write: lines of concurrent engines do not interleave
        f.write(line + "\n")


class RolloutEngine:
    def __init__(self, settings: EngineSettings, llm) -> None:
        self.settings = settings
        self.llm = llm
        self.version = 0
        self._request_ids = itertools.count()
        self._expected_names = checkpoint_tensor_names(settings.model)
        self._update_dir = shm_folder("weights")
        self._update_file = SharedUpdateFile(self._update_dir)
        self.update_lock = asyncio.Lock()  # one update at a time: they share the file
        self._held_shm: set[int] = set()
        self._ipc_dir: Path | None = None  # vLLM's ZMQ sockets (see start)
        self.worker_numerics: dict = {}  # what the worker process runs with (see start)
        self.preemption_counter: PreemptionCounter | None = None  # with count_preemptions
        self._transfer = None  # weight_transport=gloo: the trainer side of vLLM's transfer API
        self.adapter = None  # with max_lora_rank: the LoRARequest every request carries
        self.routes_info: dict = {"routes_captured": False}  # MoE: what the worker records

    @classmethod
    async def start(cls, settings: EngineSettings, *, join_transfer: bool = True
                    ) -> "RolloutEngine":
        """A running engine. With `weight_transport: gloo` it joins a transfer group of its own
        (`join_transfer=False`: an EnginePool makes one group for all its engines)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        started_at = time.perf_counter()
        ensure_guard()  # before the engine creates its shared memory: reclaimed on any exit
        # vLLM names its ZMQ sockets in VLLM_RPC_BASE_PATH (default: the temp dir) and leaves them
        # there; this engine's go in a folder of its own, removed at close (or by the guardian).
        ipc_dir = temp_folder("ipc")
        # Inherited by the engine's processes at spawn; restored here afterwards.
        env = {"VLLM_RPC_BASE_PATH": str(ipc_dir)} | settings.engine_environment()
        previous = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            # No local holds the AsyncLLM: an import inside vLLM keeps a traceback whose frames
            # reach this one, and a local here would keep the engine alive past close() (its
            # __del__ then fails at interpreter exit).
            counter = PreemptionCounter() if settings.count_preemptions else None
            args = settings.to_engine_args()
            vllm_config = args.create_engine_config()
            with model_in_engine_core(vllm_config, settings.executor):
                engine = cls(settings, AsyncLLM.from_vllm_config(
                    vllm_config, enable_log_requests=args.enable_log_requests,
                    disable_log_stats=args.disable_log_stats,
                    stat_loggers=None if counter is None else [counter.stat_logger]))
        except BaseException:
            shutil.rmtree(ipc_dir, ignore_errors=True)
            raise
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        engine._ipc_dir = ipc_dir
        engine.preemption_counter = counter
        await engine.pad_single_row_gemms(settings.pad_single_row_gemm)
        if settings.record_routes:
            (engine.routes_info,) = await engine.llm.collective_rpc("parityrl_record_routes")
        await engine.llm.update_weight_version(str(engine.version))
        if settings.weight_transport == "gloo" and join_transfer:
            try:
                engine._transfer = await join_gloo_group([engine])
            except BaseException:
                await engine.close()
                raise
        log_engine_start(settings, time.perf_counter() - started_at)
        return engine

    def resolved_settings(self) -> dict:
        return (resolved_engine_settings(self.llm.vllm_config) | self.worker_numerics
                | self.routes_info)

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingConfig, *, n: int = 1,
        seed: int | None = None, group_id: int = 0,
    ) -> list[Rollout]:
        """Sample `n` completions of one prompt; returns them when all are finished."""
        from vllm.inputs import TokensPrompt

        request_id = f"r{next(self._request_ids)}"
        params = sampling.to_vllm(seed=seed, n=n)
        if self.settings.max_lora_rank and self.adapter is None:
            raise RuntimeError("a LoRA engine generates with an adapter only: call "
                               "update_adapter first")
        final = None
        async for output in self.llm.generate(
            TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id=request_id,
            lora_request=self.adapter,
        ):
            final = output
        assert final is not None and final.finished
        rollouts = [self._to_rollout(prompt_ids, c, group_id) for c in final.outputs]
        if self.routes_info["routes_captured"]:
            (taken,) = await self.llm.collective_rpc("parityrl_take_routes", args=(request_id,))
            routes = decode_routes(taken)
            for rollout, completion in zip(rollouts, final.outputs):
                rollout.routes = full_length_routes(routes[completion.index], rollout)
        return rollouts

    async def generate_many(
        self, prompts: list[list[int]], sampling: SamplingConfig, *, n: int = 1,
        seed: int | None = None,
    ) -> list[Rollout]:
        """All prompts in flight at once (the engine batches them); rollouts in prompt order.

        With a seed, prompt i uses seeds seed + i*n … seed + i*n + n-1 (vLLM gives the j-th of n
        samples seed + j), so no two samples share a random stream.
        """
        return await generate_each(self.generate, prompts, sampling, n=n, seed=seed)

    def _to_rollout(self, prompt_ids, completion, group_id: int) -> Rollout:
        token_ids = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, token_ids)]
        versions = [self.version] * len(token_ids)
        for span in completion.weight_versions or []:
            versions[span.start:span.end] = [int(span.version)] * (span.end - span.start)
        return Rollout(
            prompt_ids=list(prompt_ids), completion_ids=token_ids, logprobs=logprobs,
            versions=versions, finish_reason=completion.finish_reason, group_id=group_id,
        )

    async def update_weights(
        self, state_dict: dict[str, torch.Tensor], *, version: int | None = None,
        verify: bool = True, skip: set[str] = frozenset(), reset_prefix_cache: bool = True,
    ) -> UpdateReport:
        """Push `state_dict` into the running engine without aborting requests in flight.

        Requests are frozen with their KV cache (`mode="keep", clear_cache=False`), the weights are
        reloaded in place, the prefix cache is reset (cached prefixes were computed by the old
        weights, and vLLM does not drop them on a reload), the version increments, and generation
        resumes. `version` labels the new weights (default: the current version + 1; the trainer
        passes its optimizer step). `skip` leaves tensors out on purpose and
        `reset_prefix_cache=False` keeps stale prefixes: the doctor uses both to show that a broken
        update is caught.
        """
        if self._transfer is not None:
            (report,) = await push_over_gloo([self], self._transfer, state_dict, version=version,
                                             verify=verify, skip=skip,
                                             reset_prefix_cache=reset_prefix_cache)
            return report
        async with self.update_lock:
            # Written while the engine still generates: after a reload the engine holds copies,
            # never views of the file (checked in the worker), so the file is free until the next
            # reload reads it, and generation pauses only for the reload itself.
            write_start = time.perf_counter()
            path, sent = self._update_file.write(state_dict, self.settings.dtype, skip=skip)
            start = time.perf_counter()
            await self.pause()
            try:
                (result,) = await self._control(
                    self.llm.collective_rpc("parityrl_load_weights", args=(str(path),)))
                await self.after_load(version, reset_prefix_cache)
            finally:
                await self.resume()
            resumed = time.perf_counter()
        report = self.report(sent, result, resumed - start, start - write_start)
        if verify and not report.check.ok:
            raise WeightSyncError(report.check.summary())
        return report

    async def update_adapter(
        self, tensors: dict[str, torch.Tensor], lora: dict, *, version: int | None = None,
        verify: bool = True, reset_prefix_cache: bool = True, keep_name: bool = False,
        skip: set[str] = frozenset(),
    ) -> UpdateReport:
        """Push a LoRA adapter (trainer/lora.py: PEFT-named tensors and their rank/alpha/targets)
        into the running engine, under the same contract as `update_weights`: requests in flight
        keep their KV cache and continue on the new adapter (it replaces the one slot in place),
        the prefix cache is reset, the version increments, and the slot's bytes are digested in
        the worker against what the trainer predicts. Each version gets a name of its own (vLLM
        keys prefix-cache entries by adapter name and path, not weights). The adapter is loaded by
        vLLM's own worker `add_lora` (with `load_inplace`), called together with the digests in
        one RPC (engine/worker_extension.py). `keep_name=True` reuses
        the current one, as a naive in-place reload would (the doctor's stale-cache rung);
        `skip` leaves tensors out of the folder (tests: the digests must catch it)."""
        from vllm.lora.request import LoRARequest

        from parityrl.weights.lora_folder import engine_digests, write_peft_folder

        if not self.settings.max_lora_rank:
            raise RuntimeError("this engine was started without LoRA (max_lora_rank unset)")
        async with self.update_lock:
            write_start = time.perf_counter()
            new_version = self.version + 1 if version is None else version
            name = self.adapter.lora_name if keep_name and self.adapter else f"v{new_version}"
            dtype = getattr(torch, self.settings.dtype)
            folder = write_peft_folder(self._update_dir / f"adapter-{name}",
                                       {n: t for n, t in tensors.items() if n not in skip}, lora,
                                       base_model=self.settings.model, dtype=dtype)
            sent = engine_digests(tensors, lora, dtype, self.settings.max_lora_rank)
            start = time.perf_counter()
            await self.pause()
            try:
                (result,) = await self._control(self.llm.collective_rpc(
                    "parityrl_load_adapter", args=(name, 1, str(folder))))
                await self.after_load(version, reset_prefix_cache)
                # Requests must not carry load_inplace: it would reload from disk every step.
                previous, self.adapter = self.adapter, LoRARequest(name, 1, str(folder))
            finally:
                await self.resume()
            resumed = time.perf_counter()
            if (previous is not None and previous.lora_path != str(folder)
                    and Path(previous.lora_path).parent == self._update_dir):
                shutil.rmtree(previous.lora_path, ignore_errors=True)
        report = update_report(self.version, set(sent), sent, result, resumed - start,
                               start - write_start)
        # Names the engine holds beyond the trainer's adapter: a stale slot elsewhere.
        report.check.unexpected = sorted(set(result["nonzero"]) - set(sent))
        report.engines_verified = int(report.check.ok)
        if verify and not report.check.ok:
            raise WeightSyncError(report.check.summary())
        return report

    def serve_adapter_folder(self, folder: str | Path, name: str = "served") -> None:
        """From now on generate with the PEFT adapter in `folder` (an exported one), loaded the
        way `vllm serve --lora-modules` loads it: by vLLM's own request path, from disk, under an
        id of its own (evicting the trainer's from the one slot). The next `update_adapter`
        takes the slot back; `folder` is never removed."""
        from vllm.lora.request import LoRARequest

        if not self.settings.max_lora_rank:
            raise RuntimeError("this engine was started without LoRA (max_lora_rank unset)")
        self.adapter = LoRARequest(name, SERVED_ADAPTER_ID, str(Path(folder).resolve()))

    async def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored

    async def unfinished_requests(self) -> int:
        return self.llm.get_num_unfinished_requests()

    async def pad_single_row_gemms(self, on: bool = True) -> None:
        """Run one-row GEMMs as two rows (bitwise mode does this at start), or stop doing so."""
        await self.llm.collective_rpc("parityrl_pad_single_row_gemms", args=(on,))
        (self.worker_numerics,) = await self.llm.collective_rpc("parityrl_numerics")

    # -- the steps of an update (push_over_gloo drives them on every engine of a group) ----------
    async def pause(self) -> None:
        """Freeze requests in flight with their KV cache."""
        await self._control(self.llm.pause_generation(mode="keep", clear_cache=False))

    async def finish_transfer(self) -> dict:
        """After a gloo transfer: the worker's tied-module refresh, padding and digests."""
        (result,) = await self._control(self.llm.collective_rpc("parityrl_finish_transfer"))
        return result

    async def after_load(self, version: int | None, reset_prefix_cache: bool) -> None:
        if reset_prefix_cache:
            await self._control(self.llm.reset_prefix_cache())
        self.version = self.version + 1 if version is None else version
        await self._control(self.llm.update_weight_version(str(self.version)))

    async def resume(self) -> None:
        if not self.llm.errored:
            await self._control(self.llm.resume_generation())

    def report(self, sent: dict, result: dict, pause_seconds: float,
               write_seconds: float) -> UpdateReport:
        return update_report(self.version, self._expected_names, sent, result, pause_seconds,
                             write_seconds)

    # vLLM's weight-transfer calls (weights/gloo.py EngineGroupClient), answered by this engine.
    async def transfer_init(self, init_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info))

    async def transfer_start(self) -> None:
        await self.llm.start_weight_update()

    async def transfer_update(self, update_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self.llm.update_weights(WeightTransferUpdateRequest(update_info))

    async def transfer_finish(self, weight_version: str | None = None) -> None:
        await self.llm.finish_weight_update(weight_version)

    async def _control(self, call, timeout: float = CONTROL_TIMEOUT_S):
        """Await an engine control call, but not on a dead engine: a utility call sent just before
        the engine-core process died is never answered. Raises EngineDeadError when vLLM marks the
        engine dead, asyncio.TimeoutError after `timeout` seconds."""
        from vllm.v1.engine.exceptions import EngineDeadError

        task = asyncio.ensure_future(call)
        deadline = time.monotonic() + timeout
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if self.llm.errored or time.monotonic() > deadline:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                if self.llm.errored:
                    raise EngineDeadError()
                raise asyncio.TimeoutError(f"an engine control call took more than {timeout} s")

    async def close(self) -> None:
        """Stop the engine process and let its output task finish inside this event loop."""
        if self.llm is None:
            return
        handler = getattr(self.llm, "output_handler", None)
        self._held_shm = held_by_this_process_tree()
        self.llm.shutdown(timeout=SHUTDOWN_GRACE_S)
        if isinstance(handler, asyncio.Task) and not handler.done():
            await asyncio.gather(handler, return_exceptions=True)
        self._release()

    def shutdown(self) -> None:
        """Synchronous stop, for code outside an event loop (e.g. a test fixture's teardown)."""
        if self.llm is not None:
            self._held_shm = held_by_this_process_tree()
            self.llm.shutdown(timeout=SHUTDOWN_GRACE_S)
            self._release()

    def _release(self) -> None:
        self.llm = None
        self._transfer = None
        self._update_file.close()
        gc.collect()  # AsyncLLM sits in reference cycles; collect it while its modules still exist
        for leftover in self._update_dir.glob("*"):
            if leftover.is_dir():  # a LoRA adapter folder
                shutil.rmtree(leftover, ignore_errors=True)
            leftover.unlink(missing_ok=True)
        self._update_dir.rmdir()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
        # vLLM leaves some of its message-queue segments behind when an engine is shut down
        # (reclaimed only at process exit): drop those nobody uses any more, now.
        forget_in_resource_tracker(reclaim(self._held_shm, set()))
