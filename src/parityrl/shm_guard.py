"""Reclaim a run's shared memory in /dev/shm, whatever ends the run.

    from parityrl.shm_guard import ensure_guard
    ensure_guard()          # once per process, before it creates shared memory (engine start)

A run creates files in /dev/shm that outlive it when it is killed (SIGKILL, SIGTERM, a crash): the
weight hand-over folder (a full copy of the weights), vLLM's `psm_*` message queues and
multiprocessing semaphores (`sem.*`); and in the temp dir the unix sockets of vLLM's ZMQ queues,
which it leaves behind even on a normal close (its engine processes are killed, not unbound), so
each engine gets its own `parityrl-ipc-<pid>-*` folder for them (`temp_folder`). `ensure_guard`
starts a guardian process in its own session, so that a signal sent to the run's process group
does not reach it. Every POLL_S the guardian records the /dev/shm files (by inode) that a process
of the run's tree maps or holds open, read from /proc/<pid>/maps and /proc/<pid>/fd, and the
`parityrl-<kind>-<pid>-*` folders named after a process of the tree (`shm_folder`,
`temp_folder`). When the run's root process is gone it ends the rest of the tree (`end_tree`:
GRACE_S to exit by themselves, then SIGTERM, then SIGKILL; this is what stops an engine core, its
workers, reward processes and multiprocessing's resource tracker when the main process alone is
killed), then removes each recorded file that no live process uses, and the recorded folders once
empty. A path is only ever recorded while a process of this run uses or owns
it, so files of other processes are never touched. A zombie counts as gone: it holds nothing, and
an orphan's zombie may wait long for a reaper.

    python -m parityrl.shm_guard ROOT_PID      # what ensure_guard runs

With PARITYRL_SHM_GUARD_STATE=FILE set, the guardian writes what it has recorded to FILE (JSON: its
pid, polls, inodes, folders) after every poll: for debugging, and for the test that kills a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SHM = "/dev/shm"
POLL_S = 1.0
GRACE_S = 2.0  # for the run's other processes to exit by themselves once its root is gone
KILL_WAIT_S = 3.0  # after a SIGTERM for them to be gone
# After a SIGKILL: a process with gigabytes mapped can take seconds to be torn down on a loaded
# machine, and reclaiming before it is gone leaves its files for good (they are in use then).
DEATH_WAIT_S = 60.0

_guarded_pid: int | None = None  # the process whose guardian this process started


def ensure_guard() -> None:
    """Start this process's guardian (once); a no-op where /dev/shm or /proc do not exist.

    The guardian is a grandchild, started through a shell that exits at once: a process that
    kills its own children as it exits (a Ray worker told that its owner died does) must not
    take the guardian with it."""
    global _guarded_pid
    if _guarded_pid == os.getpid() or not (os.path.isdir(SHM) and os.path.isdir("/proc/self")):
        return
    subprocess.run(
        ["/bin/sh", "-c", '"$0" -m parityrl.shm_guard "$1" &', sys.executable, str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True, check=True)
    _guarded_pid = os.getpid()


def temp_folder(kind: str, base: str | None = None) -> Path:
    """A new `parityrl-<kind>-<pid>-*` folder in `base` (default: the temp dir), named after this
    process so that the guardian knows whose it is (`owner_pid`)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"parityrl-{kind}-{os.getpid()}-", dir=base))


def shm_folder(kind: str) -> Path:
    """A new folder in /dev/shm (else the temp dir) named after this process, for the guardian."""
    return temp_folder(kind, SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK) else None)


def owner_pid(name: str) -> int | None:
    """The PID in a `parityrl-<kind>-<pid>-*` name; None for any other name."""
    parts = name.split("-")
    if name.startswith("parityrl-") and len(parts) >= 4 and parts[2].isdigit():
        return int(parts[2])
    return None


def _owned_folders(pids: set[int]) -> set[str]:
    """The `parityrl-<kind>-<pid>-*` folders (in /dev/shm and the temp dir) of the `pids`."""
    import tempfile

    found = set()
    for base in {SHM, tempfile.gettempdir()}:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        found.update(os.path.join(base, n) for n in names if owner_pid(n) in pids)
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/pid/stat): tells a reused PID apart; None for a
    process that is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _shm_inodes(pid: int) -> set[int]:
    """Inodes of the /dev/shm files that process `pid` maps or holds open.

    Inodes, not names: glibc's sem_open maps a temporary file and then links it under the
    semaphore's name, so the mapping shows a deleted name for a file that lives on.
    """
    found: set[int] = set()
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(SHM + "/"):
                found.add(int(fields[4]))
    except (OSError, ValueError):
        pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(SHM + "/"):
                    found.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
            except OSError:
                continue
    except OSError:
        pass
    return found


def _entries(folders: set[str]) -> dict[int, str]:
    """inode → path of the files directly in /dev/shm, and of the files and unix sockets in
    `folders` and their subfolders (a LoRA run's adapter folder)."""
    import stat

    out: dict[int, str] = {}
    for folder in {SHM, *folders}:
        for parent, subfolders, _ in os.walk(folder):
            if parent == SHM:
                subfolders.clear()  # /dev/shm itself: only the files directly in it
            try:
                with os.scandir(parent) as it:
                    for entry in it:
                        if entry.is_file(follow_symlinks=False) or (folder != SHM and stat.S_ISSOCK(
                                entry.stat(follow_symlinks=False).st_mode)):
                            out[entry.inode()] = entry.path
            except OSError:
                continue
    return out


class Tree:
    """The processes of one run: the root and every descendant seen so far (PID + start time,
    so that a PID the kernel hands to another process later is not mistaken for ours)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.members: dict[int, str] = {}
        start = _start_time(root)
        if start is not None:
            self.members[root] = start

    def refresh(self) -> None:
        children: dict[int, list[int]] = {}
        for pid in _pids():
            parent = _parent(pid)
            if parent is not None:
                children.setdefault(parent, []).append(pid)
        stack = [pid for pid in self.members if self.alive(pid)]
        while stack:
            pid = stack.pop()
            for child in children.get(pid, []):
                if child not in self.members and child != os.getpid():
                    start = _start_time(child)
                    if start is not None:
                        self.members[child] = start
                        stack.append(child)

    def alive(self, pid: int) -> bool:
        return pid in self.members and _start_time(pid) == self.members[pid]

    def live(self) -> list[int]:
        return [pid for pid in self.members if self.alive(pid)]


def descendants(root: int) -> list[int]:
    """`root` and every live process below it, now."""
    tree = Tree(root)
    tree.refresh()
    return tree.live()


def engine_core_pids(root: int) -> list[int]:
    """The vLLM engine-core processes below `root` (they name themselves VLLM::EngineCore)."""
    found = []
    for pid in descendants(root):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::EngineCore"):
                found.append(pid)
        except OSError:
            continue
    return found


def _in_use(inodes: set[int]) -> set[int]:
    """Which of `inodes` a live process (any process at all) still maps or holds open."""
    used: set[int] = set()
    for pid in _pids():
        if pid != os.getpid():
            used |= _shm_inodes(pid) & inodes
    return used


def reclaim(inodes: set[int], folders: set[str]) -> list[str]:
    """Remove the recorded files nobody uses (in /dev/shm and in `folders`), every file of
    `folders` nobody uses, then `folders` once empty."""
    entries = _entries(folders)
    wanted = {ino for ino, path in entries.items()
              if ino in inodes or any(path.startswith(f + os.sep) for f in folders)}
    removed = []
    for ino in sorted(wanted - _in_use(wanted)):
        try:
            os.unlink(entries[ino])
            removed.append(entries[ino])
        except OSError:
            pass
    for folder in folders:
        for parent, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):  # deepest first
            try:
                os.rmdir(parent)
                removed.append(parent)
            except OSError:
                pass
    return removed


def forget_in_resource_tracker(removed: list[str]) -> None:
    """Tell this process's multiprocessing resource tracker that `removed` files are gone.

    The tracker unlinks at exit what it still has registered and warns about each one it finds
    already removed ("leaked shared_memory objects … No such file"). Registering first makes the
    unregister harmless for names it never had."""
    from multiprocessing import resource_tracker

    kinds = {"psm_": "shared_memory", "sem.": "semaphore"}
    for path in removed:
        name = os.path.basename(path)
        kind = next((k for prefix, k in kinds.items() if name.startswith(prefix)), None)
        if os.path.dirname(path) != SHM or kind is None:
            continue
        tracked = "/" + (name.removeprefix("sem.") if kind == "semaphore" else name)
        resource_tracker.register(tracked, kind)
        resource_tracker.unregister(tracked, kind)


def held_by_this_process_tree() -> set[int]:
    """Inodes of the /dev/shm files this process and its descendants use now."""
    return set().union(*(_shm_inodes(pid) for pid in descendants(os.getpid())))


def guard(root: int) -> None:
    tree = Tree(root)
    inodes: set[int] = set()
    folders: set[str] = set()

    state_file = os.environ.get("PARITYRL_SHM_GUARD_STATE")
    polls = 0

    def record() -> None:
        nonlocal polls
        for pid in tree.live():
            inodes.update(_shm_inodes(pid))
        folders.update(_owned_folders(set(tree.members)))
        polls += 1
        if state_file:
            tmp = f"{state_file}.tmp"
            Path(tmp).write_text(json.dumps({"pid": os.getpid(), "polls": polls,
                                             "inodes": sorted(inodes), "folders": sorted(folders)}))
            os.replace(tmp, state_file)

    while tree.alive(root):
        tree.refresh()
        record()
        time.sleep(POLL_S)
    tree.refresh()  # children started since the last poll
    record()
    end_tree(tree)
    record()
    reclaim(inodes, folders)


def end_tree(tree: Tree) -> None:
    """The root is gone: its other processes get GRACE_S to exit (a clean close ends them), then
    SIGTERM, then SIGKILL. Without this an engine core outlives a run whose main process alone was
    killed (SIGKILL, the OOM killer): vLLM's core has no parent-death check, and the orphan keeps
    its weights in /dev/shm, which the reclaim must not remove while it is in use."""
    waits = {None: GRACE_S, signal.SIGTERM: KILL_WAIT_S, signal.SIGKILL: DEATH_WAIT_S}
    for sig, wait_s in waits.items():
        if sig is not None:
            for pid in tree.live():
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while tree.live() and time.monotonic() < deadline:
            tree.refresh()  # a child started meanwhile is ended too
            time.sleep(0.1)
        if not tree.live():
            return


if __name__ == "__main__":
    guard(int(sys.argv[1]))
