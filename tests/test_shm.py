"""A killed or crashed run leaves nothing behind in /dev/shm (parityrl/shm_guard.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import kill_group, shm_of, wait_gone

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


# A run that SIGKILLs or whose engine dies leaves nothing either: test_reliability.py runs both
# (`parityrl train` as a process, /dev/shm compared before and after).
