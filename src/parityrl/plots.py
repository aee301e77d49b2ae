"""Plots of a run from its metrics.jsonl: what people look at instead of reading numbers."""

from __future__ import annotations

from pathlib import Path

from parityrl.progress import pass_at_k_keys
from parityrl.runlog import read_metrics

LOG_FLOOR = 1e-12  # log panels draw smaller values (exact zeros included) at this value
PANELS = [
    ("rl/reward_mean", "reward (mean over samples)", "linear"),
    ("eval/accuracy", "held-out greedy accuracy", "linear"),
    ("rl/clip_frac", "clip rate (fraction of tokens)", "linear"),
    ("rl/entropy", "entropy of the processed distribution (nats)", "linear"),
    ("mismatch/max_abs_diff", "mismatch max |Δ logprob| (same-version tokens, nats)", "log"),
    ("mismatch/kl_k3", "mismatch KL k3 (engine ‖ trainer)", "log"),
    ("lag/mean", "lag (optimizer steps, token mean)", "linear"),
    ("mismatch/nucleus_boundary_frac", "sampled tokens outside the trainer's top-k/top-p set",
     "linear"),
]


def floor_for_log(points: list[tuple[int, float]], title: str) -> tuple[list, str]:
    """A log axis cannot draw zeros: raise small values to LOG_FLOOR and say so in the title."""
    if not any(v < LOG_FLOOR for _, v in points):
        return points, title
    floored = [(s, max(v, LOG_FLOOR)) for s, v in points]
    return floored, f"{title} (values < {LOG_FLOOR:g} drawn at {LOG_FLOOR:g})"


def _verified_beside(ax, rows: list[dict], title: str) -> str:
    """With learned rewards, the task's verified reward (it measures only) on a second axis."""
    points = [(r["step"], r["reward/verified_mean"]) for r in rows
              if r.get("reward/verified_mean") is not None]
    if not points:
        return title
    twin = ax.twinx()
    twin.plot(*zip(*points), color="tab:green", marker=".", linewidth=1)
    twin.set_ylabel("verified reward", color="tab:green", fontsize=8)
    return "training reward (blue, learned) and the verified reward (green, measures only)"


def pass_at_k_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The run's eval/pass@k curves (eval_pass_k), by k: drawn beside the greedy accuracy."""
    keys = pass_at_k_keys({k for r in rows for k in r})
    return {key.split("/", 1)[1]: [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            for key in keys}


def _pass_at_k_beside(ax, rows: list[dict], title: str) -> str:
    series = pass_at_k_series(rows)
    if not series:
        return title
    for label, points in series.items():
        ax.plot(*zip(*points), marker=".", linewidth=1, linestyle="--", label=label)
    ax.legend(fontsize=7)
    return "held-out accuracy: greedy (solid), pass@k (dashed)"


def plot_run(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    if not rows:
        return []
    fig, axes = plt.subplots(4, 2, figsize=(11, 12))
    for ax, (key, title, scale) in zip(axes.flat, PANELS):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if scale == "log":
            points, title = floor_for_log(points, title)
        if points:
            ax.plot(*zip(*points), marker=".", linewidth=1)
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        ax.set_yscale(scale)
        if key == "rl/reward_mean":
            title = _verified_beside(ax, rows, title)
        if key == "eval/accuracy":
            title = _pass_at_k_beside(ax, rows, title)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = out_dir / "training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
