"""A killed or crashed run leaves nothing behind in /dev/shm (parityrl/shm_guard.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import kill_group, shm_of, wait_for
from parityrl.shm_guard import _start_time

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this system")


def test_guardian_reclaims_segments_folders_and_semaphores_of_a_process_that_ends_its_children(
        tmp_path):
    # A parent and a child that hold what a run holds: a psm_ segment, a semaphore, a file in a
    # parityrl-<kind>-<pid>-* folder and a subfolder of it. On SIGTERM the parent SIGKILLs each of
    # its own children and exits, as a Ray worker told that its owner died does: the guardian,
    # not a child, lives on to reclaim.
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent("""
        import mmap, multiprocessing as mp, os, signal, sys, time
        from multiprocessing import shared_memory
        from parityrl.shm_guard import ensure_guard, shm_folder
        ensure_guard()
        folder = shm_folder("test")
        (folder / "adapter-v0").mkdir()  # a subfolder, as a LoRA run's adapter
        (folder / "adapter-v0" / "adapter.bin").write_bytes(b"x")
        f = open(folder / "weights.bin", "w+b"); f.truncate(4096)
        m = mmap.mmap(f.fileno(), 4096)
        seg = shared_memory.SharedMemory(create=True, size=8192)
        lock = mp.get_context("spawn").Semaphore(1)
        def child():
            other = shared_memory.SharedMemory(create=True, size=4096)
            time.sleep(600)
        p = mp.get_context("fork").Process(target=child); p.start()
        def end_children_and_exit(*_):
            for name in os.listdir("/proc"):
                try:
                    stat = open(f"/proc/{name}/stat").read()
                except OSError:
                    continue
                if name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                    os.kill(int(name), signal.SIGKILL)
            os._exit(0)
        signal.signal(signal.SIGTERM, end_children_and_exit)
        print("ready", flush=True)
        time.sleep(600)
    """))
    other = SHM / f"not-ours-{os.getpid()}"
    other.write_bytes(b"x")  # another process's file: must survive
    state = tmp_path / "guard.json"  # what the holder's guardian has recorded (shm_guard.py)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env={**os.environ, "PARITYRL_SHM_GUARD_STATE": str(state)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        held = wait_for(lambda: _holds_all_kinds(shm_of(proc.pid), proc.pid), 60,
                        "the holder and its child to hold a segment each, a semaphore, a folder")
        # Kill only once the guardian has seen all of it: a file made and killed between two
        # polls is one it never knew (a loaded machine's guardian can poll seconds apart).
        inodes = {os.stat(path).st_ino for path in held if os.path.isfile(path)}
        recorded = wait_for(lambda: _covers(_read_json(state), inodes, held), 60,
                            "the guardian to record every file and folder the holder has")
        proc.terminate()
        proc.wait()
    finally:
        kill_group(proc)
    try:
        guardian = recorded["pid"]
        wait_for(lambda: _start_time(guardian) is None, 60,  # gone, or a zombie
                 "the guardian to reclaim and exit")
        assert {p for p in held if os.path.exists(p)} == set()
        assert other.exists()
    finally:
        other.unlink(missing_ok=True)


def _holds_all_kinds(held: set[str], pid: int) -> set[str] | None:
    names = [Path(p).name for p in held]
    complete = (len([n for n in names if n.startswith("psm_")]) == 2
                and any(n.startswith("sem.") for n in names)
                and any(n.startswith(f"parityrl-test-{pid}-") for n in names))
    return held if complete else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _covers(state: dict | None, inodes: set[int], folders: set[str]) -> dict | None:
    if state and inodes <= set(state["inodes"]) and {
            f for f in folders if os.path.isdir(f)} <= set(state["folders"]):
        return state
    return None

