"""Starting and stopping a vLLM V1 `AsyncLLM`'s processes, for every engine kind (the rollout
engine, engine/engine.py; the reward model's pooling engine, engine/pooling.py).

    engine, files = start_async_llm(settings, lambda llm: MyEngine(settings, llm))
    ...
    llm.shutdown(timeout=SHUTDOWN_GRACE_S); files.release(held)

What this adds to vLLM's own start: the run's guardian before any shared memory exists
(shm_guard.py), a temp folder of the engine's own for what vLLM leaves in the temp dir, the
engine's environment (OpenMP cores, CPU attention), the model run in the engine-core process
(`executor: uni`) and the core forked from the template process (`start_method: template`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from parityrl.engine.settings import EngineSettings
from parityrl.engine.template import engine_start_method
from parityrl.shm_guard import (ensure_guard, forget_in_resource_tracker,
                                held_by_this_process_tree, reclaim, temp_folder)

T = TypeVar("T")

# vLLM waits 5 s for the engine-core process to exit on its own before killing it; on the CPU
# backend its worker never exits before the core is gone, so every close took 5.4 s (measured).
# The core has nothing left to flush once generation has stopped; its shared-memory segments are
# reclaimed below either way.
SHUTDOWN_GRACE_S = 0.5

# Where every engine start is appended as a JSON line (what started, how long it took), when set:
# the test suite counts the engines it started, in its own process and in those it spawned.
ENGINE_START_LOG = "PARITYRL_ENGINE_START_LOG"
ENGINE_ROLE = "PARITYRL_ENGINE_ROLE"


@dataclass
class EngineFiles:
    """What an engine's processes leave behind them: released at close, even after the engine
    died (then no live process holds them any more)."""

    ipc_dir: Path  # vLLM's ZMQ sockets and torch.distributed file store
    own_shm: set[int] = field(default_factory=set)  # /dev/shm inodes its processes made at start

    def release(self, held: set[int]) -> None:
        """Remove the folder, and the /dev/shm files of `held` and `own_shm` nobody uses: vLLM
        leaves some of its message-queue segments behind at shutdown (reclaimed only at process
        exit otherwise)."""
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
        forget_in_resource_tracker(reclaim(held | self.own_shm, set()))


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


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """`env` in os.environ (inherited by the engine's processes at spawn), restored after."""
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_async_llm(settings: EngineSettings, wrap: Callable[[object], T],
                    stat_loggers: list | None = None, role: str = "policy"
                    ) -> tuple[T, EngineFiles]:
    """An AsyncLLM for `settings`, handed to `wrap` at once (its result is returned), and the
    files its processes will leave behind. `role` (policy, reward_model, judge) is in the
    engine processes' environment as PARITYRL_ENGINE_ROLE: which engine a core is, for the
    tests and benchmarks that find one by it.

    No local of this function (or of the caller) may hold the AsyncLLM: an import inside vLLM
    keeps a traceback whose frames reach these, and such a local would keep the engine alive past
    its close (its __del__ then fails at interpreter exit). `wrap` runs after that import.
    """
    from vllm.v1.engine.async_llm import AsyncLLM

    ensure_guard()  # before the engine creates its shared memory: reclaimed on any exit
    # vLLM names its ZMQ sockets in VLLM_RPC_BASE_PATH and its torch.distributed file store
    # (`vllm_dist_*`) in the temp dir, and leaves both there; this engine's go in a folder of
    # its own, removed at close (or by the guardian). This process's temp dir is settled
    # first: TMPDIR below is for the engine's processes only.
    tempfile.gettempdir()
    files = EngineFiles(temp_folder("ipc"))
    env = ({"VLLM_RPC_BASE_PATH": str(files.ipc_dir), "TMPDIR": str(files.ipc_dir),
            ENGINE_ROLE: role} | settings.engine_environment())
    shm_before = held_by_this_process_tree()
    try:
        with _environment(env):
            args = settings.to_engine_args()
            vllm_config = args.create_engine_config()
            with (model_in_engine_core(vllm_config, settings.executor),
                  engine_start_method(settings.start_method)):
                wrapped = wrap(AsyncLLM.from_vllm_config(
                    vllm_config, enable_log_requests=args.enable_log_requests,
                    disable_log_stats=args.disable_log_stats, stat_loggers=stat_loggers))
    except BaseException:
        shutil.rmtree(files.ipc_dir, ignore_errors=True)
        raise
    # What the engine's processes made in /dev/shm (a semaphore, message queues).
    files.own_shm = held_by_this_process_tree() - shm_before
    return wrapped, files


def core_pids(llm) -> list[int]:
    """The PIDs of an AsyncLLM's engine-core processes (vLLM's process manager; [] where it has
    none, e.g. an in-process engine)."""
    resources = getattr(getattr(llm, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return [p.pid for p in getattr(manager, "processes", [])]


def log_engine_start(settings: EngineSettings, seconds: float) -> None:
    path = os.environ.get(ENGINE_START_LOG)
    if not path:
        return
    import json

    line = json.dumps({"pid": os.getpid(), "seconds": round(seconds, 2), "model": settings.model,
                       "dtype": settings.dtype, "settings": settings.model_dump(mode="json")})
    with open(path, "a") as f:  # one short write: lines of concurrent engines do not interleave
        f.write(line + "\n")
