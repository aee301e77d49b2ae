"""Helpers shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import os
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


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


def reward_fixtures_importable(mp) -> None:
    """tests/fixtures/rewards.py importable in this process and in `parityrl` subprocesses."""
    mp.syspath_prepend(str(FIXTURES))
    mp.setenv("PYTHONPATH", os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]))


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


def engine_core_pids(root: int) -> list[int]:
    """vLLM engine-core processes below `root` (they name themselves VLLM::EngineCore)."""
    found = []
    for pid in tree_of(root):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::EngineCore"):
                found.append(pid)
        except OSError:
            continue
    return found
