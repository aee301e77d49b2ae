"""Shared fixtures: tiny model folders built once per session (no downloads)."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

# vLLM's engine process inherits these; set before any test imports vllm.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {
    "qwen2": dict(arch="qwen2", tie_embeddings=False),
    "qwen2-tied": dict(arch="qwen2", tie_embeddings=True),
    "llama": dict(arch="llama", tie_embeddings=False),
    "llama-tied": dict(arch="llama", tie_embeddings=True),
    # MLP width 1280: the down projection's K is where oneDNN's one-row GEMM rounds differently.
    "llama-tied-wide": dict(arch="llama", tie_embeddings=True, hidden=320, heads=10, kv_heads=5),
}


@pytest.fixture(scope="module")
def loop():
    """An event loop shared by a module's tests (and its module-scoped engine)."""
    import asyncio

    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Build (once) and return the folder of a named tiny model variant."""
    from parityrl.models.tiny import make_model

    built: dict[str, str] = {}

    def get(variant: str = "qwen2") -> str:
        if variant not in built:
            folder = tmp_path_factory.mktemp(f"model-{variant}")
            built[variant] = str(make_model(folder, seed=0, **VARIANTS[variant]))
        return built[variant]

    return get


@pytest.fixture(scope="session")
def tiny_model(model_factory) -> str:
    return model_factory("qwen2")


@pytest.fixture(scope="session")
def real_model_4l() -> str:
    """SmolLM2-135M-Instruct truncated to 4 layers: its real tokenizer, chat template and first
    layers (converted once from the packaged GGUF, then cached like every built-in model)."""
    from parityrl.models.builtin import resolve_model

    return str(resolve_model("builtin:smollm2-135m-instruct-4layers"))


@pytest.fixture(scope="session")
def real_model() -> str:
    """The whole 30-layer SmolLM2-135M-Instruct (where depth matters)."""
    from parityrl.models.builtin import resolve_model

    return str(resolve_model("builtin:smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def plugins_importable():
    """The test reward and environment plugins (tests/fixtures) importable by import path, here
    and in `parityrl` subprocesses, for one module."""
    from helpers import FIXTURES

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(FIXTURES))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]))
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the tests that need it: a few logical CPUs, a capped object
    store, stopped at the end of the session (runs started inside join it)."""
    import ray

    ray.init(num_cpus=4, object_store_memory=128 << 20, include_dashboard=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


# --- the suite leaves /dev/shm (and the temp dir's parityrl-* folders) as it found it ---

SHM = "/dev/shm"


def _run_files() -> set[str] | None:
    """Paths a run may leave behind: every entry of /dev/shm, and the parityrl-* folders of the
    temp dir (vLLM's sockets); None where there is no /dev/shm."""
    if not os.path.isdir(SHM):
        return None
    temp = tempfile.gettempdir()
    return ({os.path.join(SHM, n) for n in os.listdir(SHM)}
            | {os.path.join(temp, n) for n in os.listdir(temp) if n.startswith("parityrl-")})


def pytest_sessionstart(session):
    session.config.shm_before = _run_files()


def _held_by_others(paths: set[str]) -> set[str]:
    """Of `paths`, those a live process outside this test session uses or owns (another run on
    the machine): not this session's leak."""
    from parityrl.shm_guard import Tree, _pids, _shm_inodes, owner_pid

    session = Tree(os.getpid())
    session.refresh()
    others = [p for p in _pids() if p not in session.members]
    used = set().union(*(_shm_inodes(p) for p in others)) if others else set()
    held = set()
    for path in paths:
        owner = owner_pid(os.path.basename(path))
        try:
            inode = os.stat(path).st_ino
        except OSError:
            continue
        if inode in used or (owner is not None and owner in others):
            held.add(path)
    return held


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "shm_before", None)
    if before is None:
        return
    # Killed runs' guardians reclaim within seconds: give the last ones time to finish.
    deadline = time.monotonic() + 15
    while True:
        left = _run_files() - before
        left -= _held_by_others(left)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"the tests left {len(left)} entries behind: {', '.join(sorted(left))}"
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = 1
