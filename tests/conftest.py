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

# The default tiny model has the demo model's layout (models/warm_start.py DEMO_MODEL): runs on
# builtin:arithmetic-warm and on it share engines (engine_host.py); its init is wider (0.1), so
# that a random model's distributions are peaked like a trained one's.
TINY = dict(arch="qwen2", tie_embeddings=False, hidden=128, heads=4, kv_heads=2)
VARIANTS = {
    "qwen2": TINY,
    "qwen2-tied": dict(arch="qwen2", tie_embeddings=True),
    "llama": dict(arch="llama", tie_embeddings=False),
    "llama-tied": dict(arch="llama", tie_embeddings=True),
    # MLP width 1280: the down projection's K is where oneDNN's one-row GEMM rounds differently.
    "llama-tied-wide": dict(arch="llama", tie_embeddings=True, hidden=320, heads=10, kv_heads=5),
    # Mixture of experts: 8 experts a layer, 2 a token.
    "qwen3-moe": dict(arch="qwen3_moe", experts=8, experts_per_token=2),
    "qwen2-moe": dict(arch="qwen2_moe", experts=8, experts_per_token=2),  # a shared expert
    # A one-label reward model (Qwen2ForSequenceClassification), its score head random.
    "reward": TINY | dict(head="sequence_classification"),
}


@pytest.fixture(scope="module")
def loop():
    """An event loop shared by a module's tests (and its module-scoped engine handles)."""
    import asyncio

    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# --- engines: shared across the session (engine_host.py), counted at the end --------------------

@pytest.fixture(scope="session", autouse=True)
def engine_host(request):
    """Every engine the product starts in this process (start_engine: runs, the doctor, the
    CLI) comes from one host of running engines, shared by all tests; closed at the end."""
    from engine_host import EngineHost

    from parityrl.engine.source import engines_from

    # Under pytest-xdist (make test: two workers) each worker hosts its own engines: fewer idle
    # ones each (with 4 each, a fresh run left 1.7 GB of 23 GiB free at its peak, while one
    # worker ran the real-model files and the other the Ray runs).
    host = EngineHost(max_idle=3 if os.environ.get("PYTEST_XDIST_WORKER") else 8)
    request.config.engine_host = host
    with engines_from(host):
        yield host
    host.close()
    _write_host_record(host)


def _write_host_record(host) -> None:
    """The host's starts, for the summary (written by the controller under xdist)."""
    import json

    from parityrl.engine.process import ENGINE_START_LOG

    path = os.environ.get(ENGINE_START_LOG)
    if not path:
        return
    with open(path + ".host", "w") as f:
        for start in host.starts:
            f.write(json.dumps({"label": start.label, "seconds": start.seconds, "pid": os.getpid(),
                                "asked": sorted(host.asked_by.get(start.kind, ())),
                                "leases": host.leases, "handovers": host.handovers}) + "\n")


def _engine_uses(config) -> int:
    """Engines started anywhere so far plus engines handed out by the host."""
    from parityrl.engine.process import ENGINE_START_LOG

    path = os.environ.get(ENGINE_START_LOG)
    started = sum(1 for _ in open(path)) if path and os.path.exists(path) else 0
    host = getattr(config, "engine_host", None)
    return started + (host.leases if host is not None else 0)


@pytest.fixture(autouse=True)
def engine_tests_are_marked_slow(request):
    """`make test-quick` runs the tests not marked slow: none of them may use an engine."""
    before = _engine_uses(request.config)
    yield
    if request.node.get_closest_marker("slow") is None and _engine_uses(request.config) > before:
        pytest.fail("this test used a vLLM engine: mark it slow (make test-quick runs the tests "
                    "that need none)")


# The files in order of their measured time, longest first (docs/tests.md): under xdist
# (`--dist loadfile --no-loadscope-reorder`, make test) each worker takes the next file when it
# runs low, so the short files fill the end and the two workers finish together. (xdist's
# default reorders files by their number of tests, which left test_ray.py, 6 tests and 6 min,
# to the end of one worker while the other idled 3 min.) Files not named run after, in order.
LONGEST_FIRST = ("test_ray.py", "test_reliability.py", "test_real_model.py", "test_multiturn.py",
                 "test_cli.py", "test_doctor_parity.py", "test_bitwise.py",
                 "test_doctor_sampler.py", "test_rewards.py", "test_lora.py", "test_story.py",
                 "test_tasks.py", "test_weight_sync.py", "test_demo.py", "test_moe.py",
                 "test_compare.py", "test_hardware.py", "test_distributed.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    # Stable: files not named keep their order, and so do the tests within a file.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
    # Every engine start, in this process and in those the tests spawn (parityrl train, Ray
    # actors), appends a line here (engine/engine.py log_engine_start). Under xdist every worker
    # writes a file of its own (its tests' engine accounting is its own); the controller adds
    # them up.
    from parityrl.engine.process import ENGINE_START_LOG

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and ENGINE_START_LOG in os.environ:
        os.environ[ENGINE_START_LOG] = f"{os.environ[ENGINE_START_LOG]}.{worker}"
        return
    if ENGINE_START_LOG not in os.environ:
        fd, path = tempfile.mkstemp(prefix="parityrl-engine-starts-", suffix=".jsonl")
        os.close(fd)
        os.environ[ENGINE_START_LOG] = path
        config.engine_start_log = path


def _read_lines(path: str) -> list[dict]:
    import json

    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    import glob

    from parityrl.engine.process import ENGINE_START_LOG

    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    path = os.environ.get(ENGINE_START_LOG)
    if not path or not os.path.exists(path):
        return
    logs = [path] + sorted(p for p in glob.glob(glob.escape(path) + ".gw*")
                           if not p.endswith(".host"))
    starts = [s for log in logs for s in _read_lines(log)]
    shared = [r for log in logs for r in _read_lines(log + ".host")]
    hosts = {r["pid"]: r for r in shared}  # one record per host for its totals
    test_pids = set(hosts) | {os.getpid()}
    here = [s for s in starts if s["pid"] in test_pids]
    seconds = sum(s["seconds"] for s in starts)
    write = terminalreporter.write_line
    write(f"vLLM engines started: {len(starts)}, {seconds:.0f} s starting them — "
          f"{len(shared)} shared by the tests (engine_host.py, "
          f"{sum(r['handovers'] for r in hosts.values())} hand-overs, {max(len(hosts), 1)} "
          f"host{'s' if len(hosts) > 1 else ''}), {len(here) - len(shared)} private in the test "
          f"processes, {len(starts) - len(here)} in processes the tests spawned (parityrl train, "
          "Ray actors)")
    for r in shared:
        write(f"  shared {r['seconds']:5.1f} s  {r['label']}  ({', '.join(r['asked'])})")
    if getattr(config, "engine_start_log", None):
        for leftover in [path, *glob.glob(glob.escape(path) + ".*")]:
            os.unlink(leftover)


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
    # The suite's own engine-start logs (pytest_configure) are removed by its summary, after this.
    return ({os.path.join(SHM, n) for n in os.listdir(SHM)}
            | {os.path.join(temp, n) for n in os.listdir(temp)
               if n.startswith("parityrl-") and not n.startswith("parityrl-engine-starts-")})


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
