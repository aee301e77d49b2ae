"""The soak: a long async run that meets faults on a schedule, with every resource of its processes
logged, to show that nothing grows.

    parityrl bench --only soak          # ~3,000 steps of the tiny model; bench/soak/

The run is the built-in tiny model on addition prompts, async, a checkpoint every 100 steps (2
kept). Its engine core is SIGKILLed every `kill_every` steps (the actor replaces it), and its
reward raises on about one completion in 200 (the group is rejected and counted). A sampler
thread records, every `sample_every_s`, each process of the run's tree (the main process, the
engine core, multiprocessing's resource tracker, the shared-memory guardian): resident memory,
open descriptors and threads; and the run's bytes in /dev/shm and on disk.

Growth is read from *like* moments: the sample nearest the middle of each engine's life (the
first `warmup_steps` excluded), so a restart in progress never counts as growth. The summary
gives each role's resident-memory slope (MB per 100 steps, least squares over those moments),
descriptors and threads at those moments, and whether every step was done once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from parityrl.config import build_config
from parityrl.pipeline import run_training
from parityrl.runlog import read_metrics
from parityrl.shm_guard import SHM, descendants, held_by_this_process_tree

ROLES = ("main", "engine", "resource_tracker", "guardian")


def flaky_digit_reward(prompt: str, completion: str, answer: str) -> float:
    """The share of digits in the completion (dense on an untrained model); raises on about one
    completion in 200 (a fixed hash, so a run is reproducible)."""
    if zlib.crc32((prompt + completion).encode()) % 200 == 0:
        raise ValueError("the soak's reward fails on purpose")
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


@dataclass
class SoakBench:
    steps: int = 3000
    kill_every: int = 450  # steps between SIGKILLs of the engine core: 6 kills in 3,000 steps
    warmup_steps: int = 300
    sample_every_s: float = 5.0


def soak_config(rows: Path, cfg: SoakBench) -> dict:
    return {
        "name": "soak", "seed": 0, "model": "builtin:tiny", "dtype": "float32", "mode": "async",
        "max_steps": cfg.steps,
        "sampling": {"temperature": 1.0, "max_tokens": 16},
        "task": {"type": "jsonl", "path": str(rows), "reward": f"{__name__}:flaky_digit_reward",
                 "reward_timeout_s": 30.0},
        "actor": {"group_size": 4, "prompts_per_step": 4, "max_lag": 1,
                  "max_restarts": 1000, "max_rejected_frac": 0.5},
        "trainer": {"optim": {"lr": 1.0e-4}},
        "checkpoint": {"every": 100, "keep": 2},
        "engine": {"max_model_len": 64, "kv_cache_gib": 0.1},
    }


def write_rows(path: Path) -> Path:
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 100)
            for b in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the processes of the run and what they hold ----------------------------------------------------
def run_tree() -> dict[int, str]:
    """pid → role for this process and its descendants."""
    found = {}
    for pid in descendants(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        found[pid] = ("main" if pid == os.getpid() else "engine" if b"VLLM::EngineCore" in cmdline
                      else "resource_tracker" if b"resource_tracker" in cmdline
                      else "guardian" if b"parityrl.shm_guard" in cmdline else "other")
    return found


def process_resources(pid: int) -> dict | None:
    try:
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "fds": fds,
            "threads": int(status["Threads"])}


def shm_usage() -> dict:
    """Bytes of the /dev/shm files this process tree maps or holds open, and every file in
    /dev/shm (a file left behind by a dead engine is held by nobody: only the count shows it;
    the soak assumes nothing else on the machine uses /dev/shm meanwhile)."""
    held, total, files_now = held_by_this_process_tree(), 0, 0
    for folder, _, files in os.walk(SHM):
        for name in files:
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            files_now += 1
            total += st.st_size if st.st_ino in held else 0
    return {"shm_mb": total / 2**20, "shm_files": files_now}


def dir_bytes(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


class Sampler(threading.Thread):
    """Every `every_s` one row per process of the tree, and the run's /dev/shm and disk bytes."""

    def __init__(self, run_dir: Path, out: Path, every_s: float) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.out, self.every_s = run_dir, out, every_s
        self.step = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        began = time.monotonic()
        with self.out.open("w") as f:
            while not self.stopped.wait(self.every_s):
                row = {"t": round(time.monotonic() - began, 1), "step": self.step,
                       **shm_usage(), "run_dir_mb": dir_bytes(self.run_dir) / 2**20,
                       "processes": {}}
                for pid, role in run_tree().items():
                    resources = process_resources(pid)
                    if resources is not None:
                        row["processes"][f"{role}:{pid}"] = resources
                f.write(json.dumps(row) + "\n")
                f.flush()


def kill_engine_cores() -> list[int]:
    pids = [pid for pid, role in run_tree().items() if role == "engine"]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


# -- the run and its reading ----------------------------------------------------------------------
def run(cfg: SoakBench = SoakBench(), out: Path = Path("bench/soak"), say=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    tree = soak_config(write_rows(out / "rows.jsonl"), cfg)
    sampler = Sampler(run_dir, out / "resources.jsonl", cfg.sample_every_s)
    kills: list[dict] = []

    def on_step(step: int, metrics: dict) -> None:
        sampler.step = step
        if step % cfg.kill_every == 0 and step < cfg.steps:
            kills.append({"step": step, "pids": kill_engine_cores()})
        if step % 100 == 0:
            say(f"soak: step {step}/{cfg.steps}, {len(kills)} engine kills")

    say(f"soak: {cfg.steps} steps, the engine killed every {cfg.kill_every}; {out}")
    began = time.perf_counter()
    sampler.start()
    try:
        run_training(build_config(tree), run_dir, on_step=on_step, on_message=lambda m: None)
    finally:
        sampler.stopped.set()
        sampler.join()
    summary = summarize(run_dir, out / "resources.jsonl", kills, cfg)
    summary["seconds"] = time.perf_counter() - began
    summary["setup"] = {"config": tree, "bench": cfg.__dict__}
    (out / "soak.json").write_text(json.dumps(summary, indent=1))
    plot_soak(out / "resources.jsonl", kills, out / "soak.png")
    return summary


def summarize(run_dir: Path, resources: Path, kills: list[dict], cfg: SoakBench) -> dict:
    rows = [json.loads(line) for line in resources.read_text().splitlines()]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steps = [m["step"] for m in metrics]
    moments = steady_moments(rows, [k["step"] for k in kills], cfg)
    per_role = {}
    for role in ROLES:
        points = [(r["step"], v) for r in moments
                  for key, v in r["processes"].items() if key.split(":")[0] == role]
        if len(points) < 2:
            continue
        per_role[role] = {
            "rss_mb_per_100_steps": 100 * slope([(s, v["rss_mb"]) for s, v in points]),
            "rss_mb": [round(v["rss_mb"], 1) for _, v in points],
            "fds": [v["fds"] for _, v in points], "threads": [v["threads"] for _, v in points]}
    problems = read_metrics(run_dir / "problems.jsonl")
    seen = [i for r in problems for kind in ("trained", "rejected", "dropped") for i in r[kind]]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    last = metrics[-1]
    return {
        "steps": len(steps), "steps_each_once": steps == list(range(1, len(steps) + 1)),
        "problems_each_once": len(seen) == len(set(seen)),
        "engine_kills": len(kills), "engine_restarts": last.get("engine/restarts"),
        "rejected_reward_error": last.get("rollouts/rejected_reward_error"),
        # The actor's latest recovery is on every row after it: one value per restart.
        "recovery_s": list(dict.fromkeys(m["engine/recovery_s"] for m in metrics
                                         if "engine/recovery_s" in m)),
        "checkpoints_left": checkpoints,
        "shm_mb": [round(r["shm_mb"], 2) for r in moments],
        "shm_files": [r.get("shm_files") for r in moments],
        "run_dir_mb": [round(r["run_dir_mb"], 2) for r in moments],
        "moment_steps": [r["step"] for r in moments], "roles": per_role,
    }


def steady_moments(rows: list[dict], kill_steps: list[int], cfg: SoakBench) -> list[dict]:
    """The sample nearest the middle of each engine's life, past the warm-up."""
    bounds = [0, *kill_steps, cfg.steps]
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        middle = (max(lo, cfg.warmup_steps) + hi) / 2
        inside = [r for r in rows if max(lo, cfg.warmup_steps) < r["step"] < hi]
        if inside:
            out.append(min(inside, key=lambda r: abs(r["step"] - middle)))
    return out


def slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def plot_soak(resources: Path, kills: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in resources.read_text().splitlines()]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = (("rss_mb", "resident memory (MB)"), ("fds", "open descriptors"),
              ("threads", "threads"))
    for ax, (key, title) in zip(axes.flat, panels):
        for role in ROLES:
            points = [(r["step"], v[key]) for r in rows for k, v in r["processes"].items()
                      if k.split(":")[0] == role]
            if points:
                ax.plot(*zip(*points), ".", markersize=2, label=role)
        ax.set_title(title)
    axes[0][0].legend(markerscale=5)
    ax = axes[1][1]
    ax.plot([r["step"] for r in rows], [r["shm_mb"] for r in rows], label="/dev/shm held (MB)")
    ax.plot([r["step"] for r in rows], [r["run_dir_mb"] for r in rows], label="run dir (MB)")
    ax.plot([r["step"] for r in rows], [r.get("shm_files", 0) for r in rows],
            label="files in /dev/shm")
    ax.set_title("bytes")
    ax.legend()
    for ax in axes.flat:
        for k in kills:
            ax.axvline(k["step"], color="grey", linewidth=0.5)
    for ax in axes[1]:
        ax.set_xlabel("step (grey: engine core SIGKILLed)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
