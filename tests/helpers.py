"""Helpers shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


@contextmanager
def engine_running(loop, settings):
    """An engine with `settings` for code running on `loop`: the session's shared one of that
    kind (engine_host.py), holding the settings' model weights at version 0; handed back on exit."""
    from parityrl.engine.source import start_engine

    engine = loop.run_until_complete(start_engine(settings))
    try:
        yield engine
    finally:
        loop.run_until_complete(engine.close())


@contextmanager
def private_engine(loop, settings):
    """An engine of the caller's own, started on `loop` and stopped on exit: for a test that
    kills or breaks it, or must watch it start or close."""
    from parityrl.engine.engine import RolloutEngine

    engine = loop.run_until_complete(RolloutEngine.start(settings))
    try:
        yield engine
    finally:
        loop.run_until_complete(engine.close())


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`parityrl ARGS` run by its entry point in this process, so that the engines it starts come
    from the session's host: exit code, stdout and stderr as a subprocess would give them."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from parityrl.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["parityrl", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["parityrl", *args], code, out.getvalue(), err.getvalue())


def write_addition_rows(path: Path) -> Path:
    """90 JSONL rows "a+b=" → "a+b" (a in 10..39, b in 0..2)."""
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 40) for b in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def with_overrides(cfg: dict, overrides: dict) -> dict:
    """`cfg` with dotted keys ("actor.group_size") set to their values."""
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return cfg


def digit_share_config(model: str, prompts: Path, **overrides) -> dict:
    """A training run on `prompts` (write_addition_rows) with the dense test reward (the share
    of digits in a completion: an untrained tiny model gets non-zero advantages from it), small
    enough for the suite; dotted `overrides` adjust it ("actor.prompts_per_step": 6)."""
    cfg = {
        "name": "test", "seed": 0, "max_steps": 6, "mode": "async", "model": model,
        "sampling": {"temperature": 0.7, "max_tokens": 32},
        "task": {"type": "jsonl", "path": str(prompts), "reward": "rewards:digit_share"},
        "actor": {"group_size": 4, "prompts_per_step": 4},
        "trainer": {"optim": {"lr": 1e-3}},
        "engine": {"max_model_len": 128, "kv_cache_gib": 0.1},
        "tensorboard": False,
    }
    return with_overrides(cfg, overrides)


def tree_of(root: int) -> list[int]:
    """The PIDs of `root` and its descendants, now."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack += children.get(pid, [])
    return out


# --- what a run holds in /dev/shm ----------------------------------------------------------------

def shm_of(root: int) -> set[str]:
    """What the run rooted at `root` holds in /dev/shm right now: paths of the files it maps or
    holds open, and its parityrl-* folders."""
    from parityrl.shm_guard import _entries, _owned_folders, _shm_inodes

    pids = tree_of(root)
    inodes = set().union(*(_shm_inodes(p) for p in pids))
    folders = _owned_folders(set(pids))
    return {path for ino, path in _entries(folders).items() if ino in inodes} | folders


def wait_for(condition, seconds: float, what: str):
    """Poll `condition()` until it returns something truthy (returned); fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.1)
    return value


def wait_for_processes_gone(pids: list[int], seconds: float) -> list[int]:
    """Of `pids`, those still alive (zombies count as gone) after up to `seconds`."""
    from parityrl.shm_guard import _start_time

    starts = {pid: _start_time(pid) for pid in pids}
    deadline = time.monotonic() + seconds
    while True:
        left = [p for p, start in starts.items() if start is not None and _start_time(p) == start]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def wait_gone(paths: set[str], seconds: float = 30.0) -> set[str]:
    """Of `paths`, those still there after up to `seconds` (a guardian reclaims within a few
    seconds of a run's end; a loaded machine's within more)."""
    deadline = time.monotonic() + seconds
    while (left := {p for p in paths if os.path.exists(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# --- `parityrl train` as a process the test can kill ---------------------------------------------

def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "parityrl.cli", "train", *args]


def start_train(*args: str, env: dict | None = None, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """`parityrl train ARGS` in a session of its own: os.killpg reaches it and its engines."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.Popen(train_cmd(*args), env=env, stdout=stdout, stderr=stderr, text=True,
                            start_new_session=True)


def wait_while_running(proc: subprocess.Popen, done, timeout: float = 300) -> None:
    """Poll until `done()`; fail (with the run's stderr) if the run exits or takes too long."""
    deadline = time.time() + timeout
    while not done():
        if proc.poll() is not None:
            raise AssertionError("training exited early: "
                                 + (proc.stderr.read()[-3000:] if proc.stderr else ""))
        assert time.time() < deadline, "training too slow"
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started: its engines too, even when the CLI process
    itself has already exited."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def metric_rows(run_dir: Path) -> int:
    """Steps written to the run's metrics.jsonl so far."""
    from parityrl.runlog import read_metrics

    return len(read_metrics(run_dir / "metrics.jsonl"))


async def check_engine_interface(engine, model_dir: str) -> None:
    """What every engine kind answers alike (engine/interface.py): rollouts tagged with the
    engine's version and carrying logprobs, an update that lands whole (digests) under the
    version asked for, rollouts of the new weights that the trainer rescores exactly, liveness,
    and the resolved settings."""
    import torch

    from parityrl.core.mismatch import mismatch_metrics
    from parityrl.core.sampling import SamplingConfig
    from parityrl.engine.interface import Engine
    from parityrl.models.load import load_policy
    from parityrl.trainer.batch import rollout_logprobs

    assert isinstance(engine, Engine)
    sampling = SamplingConfig(temperature=0.7, max_tokens=8)
    prompts, before = [[5, 6, 76, 7, 84], [20, 21, 22]], engine.version
    rollouts = await engine.generate_many(prompts, sampling, n=2, seed=0)
    assert [len(r.completion_ids) > 0 for r in rollouts] == [True] * 4
    assert all(v == before for r in rollouts for v in r.versions)
    assert all(lp <= 0 for r in rollouts for lp in r.logprobs)

    model = load_policy(model_dir)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05 * p.std())
    report = await engine.update_weights(model.state_dict(), version=before + 3)
    assert report.check.ok and report.check.checked > 0 and report.engines_verified >= 1
    assert report.version == engine.version == before + 3
    rollouts = await engine.generate_many(prompts, sampling, n=2, seed=1)
    assert all(v == before + 3 for r in rollouts for v in r.versions)
    scored = rollout_logprobs(model, rollouts, sampling, pad_id=0)
    mismatch = mismatch_metrics(torch.cat([s.logprobs for s in scored]),
                                torch.tensor([x for r in rollouts for x in r.logprobs]))
    assert mismatch["mismatch/max_abs_diff"] <= 1e-5
    assert await engine.alive()
    resolved = engine.resolved_settings()
    if engine.settings.logprobs_mode is not None:
        assert resolved["logprobs_mode"] == engine.settings.logprobs_mode
