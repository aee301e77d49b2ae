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
import gc
import itertools
import shutil
import time
from pathlib import Path

import torch

from parityrl.engine.routes import decode_routes, full_length_routes
from parityrl.engine.settings import EngineSettings, resolved_engine_settings
from parityrl.engine.process import (SHUTDOWN_GRACE_S, EngineFiles, log_engine_start,
                                     start_async_llm)
from parityrl.shm_guard import held_by_this_process_tree, shm_folder
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.weights.lora_folder import AdapterFolderTransport, AdapterPayload
from parityrl.weights.shm_file import SharedFileTransport, checkpoint_tensor_names
from parityrl.weights.update import UpdateReport, WeightsPayload, WeightSyncError, push

__all__ = ["RolloutEngine", "UpdateReport", "WeightSyncError", "generate_each"]


# The trainer's adapter is LoRA id 1 (update_adapter); an exported folder served is id 2.
SERVED_ADAPTER_ID = 2
# An engine control call (pause, reload, resume) taking longer than this means a stuck engine.
CONTROL_TIMEOUT_S = 300.0


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


async def join_gloo_group(engines: list):
    """One gloo group of the trainer (rank 0) and every engine's worker (engine i at rank 1 + i):
    the transport of their updates. `engines`: RolloutEngines, or stand-ins for engines in other
    processes that answer the same calls (cluster/engine_role.py)."""
    from parityrl.weights.gloo import GlooTransport  # imports vLLM

    first = engines[0].settings
    return await GlooTransport.join(engines, first.weight_transport_address, first.dtype,
                                    CONTROL_TIMEOUT_S)


async def generate_each(generate, prompts: list[list[int]], sampling: SamplingConfig, *,
                        n: int, seed: int | None) -> list[Rollout]:
    """`generate` for every prompt at once, rollouts in prompt order; prompt i gets seeds
    seed + i*n … (see `RolloutEngine.generate_many`)."""
    groups = await asyncio.gather(*[
        generate(p, sampling, n=n, group_id=i, seed=None if seed is None else seed + i * n)
        for i, p in enumerate(prompts)
    ])
    return [r for group in groups for r in group]


class RolloutEngine:
    def __init__(self, settings: EngineSettings, llm) -> None:
        self.settings = settings
        self.llm = llm
        self.version = 0
        self._request_ids = itertools.count()
        self.expected_names = checkpoint_tensor_names(settings.model)
        self._update_dir = shm_folder("weights")
        self.update_lock = asyncio.Lock()  # one update at a time (weights/update.py push)
        self._held_shm: set[int] = set()
        self._files: EngineFiles | None = None  # what its processes leave behind (see start)
        self.worker_numerics: dict = {}  # what the worker process runs with (see start)
        self.preemption_counter: PreemptionCounter | None = None  # with count_preemptions
        # How full updates arrive: the shared file, or a gloo group of this engine's own (start).
        self._shared_file = SharedFileTransport(self._update_dir, settings.dtype)
        self.transport = self._shared_file
        self._adapters = (AdapterFolderTransport(self._update_dir, settings.model, settings.dtype,
                                                 settings.max_lora_rank)
                          if settings.max_lora_rank else None)
        self.adapter = None  # with max_lora_rank: the LoRARequest every request carries
        self.routes_info: dict = {"routes_captured": False}  # MoE: what the worker records

    @classmethod
    async def start(cls, settings: EngineSettings, *, join_transfer: bool = True,
                    role: str = "policy") -> "RolloutEngine":
        """A running engine. With `weight_transport: gloo` it joins a transfer group of its own
        (`join_transfer=False`: an EnginePool makes one group for all its engines). `role`:
        policy, or judge (engine/process.py)."""
        started_at = time.perf_counter()
        counter = PreemptionCounter() if settings.count_preemptions else None
        engine, files = start_async_llm(
            settings, lambda llm: cls(settings, llm),
            stat_loggers=None if counter is None else [counter.stat_logger], role=role)
        engine._files = files
        engine.preemption_counter = counter
        await engine.pad_single_row_gemms(settings.pad_single_row_gemm)
        if settings.record_routes:
            (engine.routes_info,) = await engine.llm.collective_rpc("parityrl_record_routes")
        await engine.llm.update_weight_version(str(engine.version))
        if settings.weight_transport == "gloo" and join_transfer:
            try:
                engine.transport = await join_gloo_group([engine])
            except BaseException:
                await engine.close()
                raise
        log_engine_start(settings, time.perf_counter() - started_at)
        return engine

    def resolved_settings(self) -> dict:
        return (resolved_engine_settings(self.llm.vllm_config) | self.worker_numerics
                | self.routes_info | {"start_method": self.settings.start_method})

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
        """Push `state_dict` into the running engine without aborting requests in flight
        (weights/update.py `push`: pause(keep) → load → prefix-cache reset → version → resume →
        digests). `version` labels the new weights (default: the current version + 1; the trainer
        passes its optimizer step). `skip` leaves tensors out on purpose and
        `reset_prefix_cache=False` keeps stale prefixes: the doctor uses both to show that a broken
        update is caught.
        """
        (report,) = await push([self], self.transport, WeightsPayload(state_dict, skip),
                               version=version, verify=verify,
                               reset_prefix_cache=reset_prefix_cache)
        return report

    async def update_adapter(
        self, tensors: dict[str, torch.Tensor], lora: dict, *, version: int | None = None,
        verify: bool = True, reset_prefix_cache: bool = True, keep_name: bool = False,
        skip: set[str] = frozenset(),
    ) -> UpdateReport:
        """Push a LoRA adapter (trainer/lora.py: PEFT-named tensors and their rank/alpha/targets)
        into the running engine, under the same contract as `update_weights`, through the
        adapter's transport (weights/lora_folder.py): it replaces the one slot in place, requests
        in flight continue on it, the slot's bytes are digested in the worker against what the
        trainer predicts. Each version gets a name of its own; `keep_name=True` reuses the
        current one, as a naive in-place reload would (the doctor's stale-cache rung); `skip`
        leaves tensors out of the folder (tests: the digests must catch it)."""
        if self._adapters is None:
            raise RuntimeError("this engine was started without LoRA (max_lora_rank unset)")
        new_version = self.version + 1 if version is None else version
        previous = self.adapter
        name = previous.lora_name if keep_name and previous else f"v{new_version}"
        (report,) = await push([self], self._adapters, AdapterPayload(tensors, lora, name, skip),
                               version=version, verify=verify,
                               reset_prefix_cache=reset_prefix_cache)
        if (previous is not None and previous.lora_path != self.adapter.lora_path
                and Path(previous.lora_path).parent == self._update_dir):
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return report

    def use_adapter(self, name: str, folder: Path) -> None:
        """Requests carry this adapter from now on (without load_inplace: it would reload from
        disk every step)."""
        from vllm.lora.request import LoRARequest

        self.adapter = LoRARequest(name, 1, str(folder))

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

    # -- an update's steps (weights/update.py push drives them, on every engine of a group) -----
    async def pause(self) -> None:
        """Freeze requests in flight with their KV cache."""
        await self._control(self.llm.pause_generation(mode="keep", clear_cache=False))

    async def worker_call(self, method: str, *args):
        """One call of the worker extension (engine/worker_extension.py) while paused."""
        (result,) = await self._control(self.llm.collective_rpc(method, args=args))
        return result

    async def after_load(self, version: int | None, reset_prefix_cache: bool) -> None:
        if reset_prefix_cache:
            await self._control(self.llm.reset_prefix_cache())
        self.version = self.version + 1 if version is None else version
        await self._control(self.llm.update_weight_version(str(self.version)))

    async def resume(self) -> None:
        if not self.llm.errored:
            await self._control(self.llm.resume_generation())

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
        self._shared_file.close()
        self.transport = self._shared_file  # a gloo group ends with its engines
        gc.collect()  # AsyncLLM sits in reference cycles; collect it while its modules still exist
        for leftover in self._update_dir.glob("*"):
            if leftover.is_dir():  # a LoRA adapter folder
                shutil.rmtree(leftover, ignore_errors=True)
            leftover.unlink(missing_ok=True)
        self._update_dir.rmdir()
        if self._files is not None:
            self._files.release(self._held_shm)
