"""A killed or crashed run leaves nothing behind in /dev/shm (parityrl/shm_guard.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from helpers import (engine_core_pids, kill_group, metric_rows, shm_of, start_train,
                     wait_gone, wait_while_running)

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this system")


def test_guardian_reclaims_segments_folders_and_semaphores_of_a_killed_process_group(tmp_path):
    # A parent and a child that hold what a run holds: a psm_ segment, a semaphore, a file in a
    # parityrl-<kind>-<pid>-* folder; SIGKILL to the whole group.
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent("""
        import mmap, multiprocessing as mp, os, sys, time
        from multiprocessing import shared_memory
        from parityrl.shm_guard import ensure_guard, shm_folder
        ensure_guard()
        folder = shm_folder("test")
        f = open(folder / "weights.bin", "w+b"); f.truncate(4096)
        m = mmap.mmap(f.fileno(), 4096)
        seg = shared_memory.SharedMemory(create=True, size=8192)
        lock = mp.get_context("spawn").Semaphore(1)
        def child():
            other = shared_memory.SharedMemory(create=True, size=4096)
            time.sleep(600)
        p = mp.get_context("fork").Process(target=child); p.start()
        print("ready", flush=True)
        time.sleep(600)
    """))
    other = SHM / f"not-ours-{os.getpid()}"
    other.write_bytes(b"x")  # another process's file: must survive
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # the guardian's first polls
        held = shm_of(proc.pid)
        names = [Path(p).name for p in held]
        assert len([n for n in names if n.startswith("psm_")]) == 2, held
        assert any(n.startswith("sem.") for n in names), held
        assert any(n.startswith(f"parityrl-test-{proc.pid}-") for n in names), held
    finally:
        kill_group(proc)
    assert wait_gone(held) == set()
    assert other.exists()
    other.unlink()


def _train_config(model: str, prompts: Path, tmp_path: Path, max_steps: int) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "shm", "max_steps": max_steps, "mode": "async", "model": model,
        "sampling": {"temperature": 0.7, "max_tokens": 48},
        "task": {"type": "jsonl", "path": str(prompts)},
        # No engine restart: a dead engine ends the run (test_reliability covers restarts).
        "actor": {"group_size": 4, "prompts_per_step": 4, "max_restarts": 0},
        "engine": {"max_model_len": 128, "kv_cache_gib": 0.1},
        "checkpoint": {"every": 100},
    }))
    return config


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n"
                            for a in range(50)))
    return path


def _running_train(model: str, prompts: Path, tmp_path: Path):
    """A `parityrl train` process two steps into its run, and what it holds in /dev/shm."""
    run_dir = tmp_path / "run"
    # stderr is read once the run has exited (one error line); it stays short.
    proc = start_train(str(_train_config(model, prompts, tmp_path, 50)), "--out", str(run_dir),
                       stderr=subprocess.PIPE)
    try:
        wait_while_running(proc, lambda: metric_rows(run_dir) >= 2)
    except BaseException:
        kill_group(proc)
        raise
    return proc, shm_of(proc.pid)


@pytest.mark.slow
def test_run_whose_engine_core_dies_exits_and_leaves_nothing(tiny_model, prompts, tmp_path):
    proc, held = _running_train(tiny_model, prompts, tmp_path)
    try:
        cores = engine_core_pids(proc.pid)
        assert cores, "no engine-core process found"
        os.kill(cores[0], signal.SIGKILL)
        proc.wait(timeout=120)
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.read().splitlines() if line.startswith("error:")]
        assert errors and "engine died" in errors[0], errors
    finally:
        kill_group(proc)
    assert wait_gone(held) == set()
