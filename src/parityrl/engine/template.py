"""Engine cores forked from a template process that has imported vLLM once (`start_method:
template`), instead of spawned fresh (vLLM's CPU choice), each of which imports vLLM again.

    with engine_start_method("template"):
        AsyncLLM.from_vllm_config(...)      # its engine core forks from the template

The template is multiprocessing's forkserver for this process, with vLLM's engine core, the CPU
worker and parityrl's worker extension preloaded. It is started by the first engine and kept for
the process's life: the first start costs what a spawn costs; each later start (a restart after an
engine death, the next engine of a pool, the doctor's next rung) skips the import.

A forked core inherits the template's environment, not this process's, and vLLM configures an
engine through environment variables set just before it starts the core (the RPC folder, the
OpenMP thread count and cores, the CPU attention knobs). So the core's target is wrapped: the
environment at `Process(...)` is carried over and set before vLLM's own entry point runs. vLLM's
CPU worker then sets the OpenMP thread count and binds each thread to its core itself
(`init_cpu_threads_env`), as it does in a spawned core; what the OpenMP runtime read from the
template's environment when it loaded is overridden there.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile

# What the template imports once: the engine core's entry point, the CPU worker, our extension.
PRELOAD = ["vllm.v1.engine.core", "vllm.v1.worker.cpu_worker",
           "parityrl.engine.worker_extension"]


def _run_with_environ(environ: dict[str, str], target, *args, **kwargs):
    """The core's entry point, in the environment its starter had (runs in the forked core)."""
    try:  # setproctitle claims the memory of argv and environ on first use: before environ moves
        import setproctitle  # (else vLLM's "VLLM::EngineCore" title is silently not set)

        setproctitle.setproctitle(setproctitle.getproctitle())
    except ImportError:
        pass
    os.environ.clear()
    os.environ.update(environ)
    tempfile.tempdir = None  # the template's cached temp dir: read TMPDIR again
    return target(*args, **kwargs)


class _TemplateContext:
    """multiprocessing's forkserver context, whose processes take the starter's environment."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("forkserver")

    def Process(self, target=None, name=None, args=(), kwargs=None, **rest):  # noqa: N802
        return self._context.Process(target=_run_with_environ, name=name,
                                     args=(dict(os.environ), target, *args),
                                     kwargs=kwargs or {}, **rest)

    def __getattr__(self, name):
        return getattr(self._context, name)


_preloaded = False


@contextlib.contextmanager
def engine_start_method(method: str):
    """With "template", the engine cores vLLM starts in the body fork from the template (in a
    Ray actor they are spawned: Ray's worker processes are not ours to fork servers from)."""
    import vllm.v1.engine.utils as engine_utils
    from vllm.ray.lazy_utils import is_in_ray_actor

    if method != "template" or is_in_ray_actor():
        yield
        return

    global _preloaded
    if not _preloaded:  # before the forkserver starts: it reads the list once
        multiprocessing.set_forkserver_preload(PRELOAD)
        _preloaded = True
    original = engine_utils.get_mp_context
    engine_utils.get_mp_context = _TemplateContext
    try:
        yield
    finally:
        engine_utils.get_mp_context = original
