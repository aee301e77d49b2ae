"""What the doctor says: a table, a verdict in plain words, JSON, a Markdown report with plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from parityrl.doctor.ladder import LADDER, RungResult
from parityrl.mismatch import METRIC_NAMES

PARITY_SETTINGS = (
    "logprobs_mode=processed_logprobs; enable_prefix_caching=False; async_scheduling=False; "
    "enable_chunked_prefill=False; enforce_eager=True; a fixed seed; "
    "hf_overrides={'head_dtype': 'float32'} with an fp32 lm_head in the trainer; weight updates "
    "with pause_generation(mode='keep', clear_cache=False), reset_prefix_cache() and a digest check"
)


def verdict(results: list[RungResult], floor: dict, tol: float) -> tuple[str, bool]:
    """A verdict in plain words, and whether the last rung is within `tol`."""
    fixes = {r.name: r for r in LADDER}
    key = "mismatch/mean_abs_diff"
    lines = []
    drops = []
    for prev, cur in zip(results, results[1:]):
        drops.append((prev.metrics[key] - cur.metrics[key], prev, cur))
    biggest = max((d for d, _, _ in drops), default=0.0)
    movers = [(d, p, c) for d, p, c in drops if biggest > 0 and d >= 0.25 * biggest
              and d > 10 * max(floor.get(key, 0.0), 1e-9)]
    for d, prev, cur in sorted(movers, key=lambda x: -x[0]):
        lines.append(
            f"The {cur.layer} layer moved the mismatch most: '{cur.name}' "
            f"({fixes[cur.name].fix}) took mean |Δ| from {prev.metrics[key]:.3g} to "
            f"{cur.metrics[key]:.3g}."
        )
        if cur.name == "processed-logprobs":
            offset = prev.metrics["mismatch/mean_diff"]
            lines.append(
                f"  That is the logprob semantics: by default vLLM V1 reports logprobs of the raw "
                f"model distribution, while it samples from the processed one (temperature/top-k/"
                f"top-p); mean signed Δ was {offset:+.3g}."
            )
    for d, prev, cur in drops:
        if d < 0 and -d > 10 * max(floor.get(key, 0.0), 1e-7):
            lines.append(
                f"'{cur.name}' made the mismatch WORSE (mean |Δ| {prev.metrics[key]:.3g} → "
                f"{cur.metrics[key]:.3g}): look at the {cur.layer} layer."
            )
    for r in results:
        if r.sync_ok is False:
            lines.append(f"Weight synchronisation is broken at '{r.name}': {r.sync_check}.")
    if not movers and not lines:
        lines.append("No rung moved the mismatch beyond the trainer's own noise floor.")
    last_rung = [r for r in results if r.name == results[-1].name]
    max_abs = max(r.metrics["mismatch/max_abs_diff"] for r in last_rung)
    check = tolerance_check(last_rung, tol)
    passed = check["failing"] == 0 and all(r.sync_ok is not False for r in results)
    floor_max = floor.get("mismatch/max_abs_diff", float("nan"))
    lines.append(
        f"Last rung '{last_rung[0].name}': max |Δ| = {max_abs:.3g} (tolerance {tol:g}) → "
        f"{'PASS' if passed else 'FAIL'}. Trainer noise floor (batched vs one at a time): "
        f"max |Δ| = {floor_max:.3g}."
    )
    if check["beyond_tol"]:
        lines.append(
            f"  {check['beyond_tol']} of {check['tokens']} tokens exceed the tolerance; "
            f"{check['beyond_tol'] - check['failing']} of them lie within twice the trainer's own "
            f"rounding error on that token (vs a float64 evaluation, up to "
            f"{check['precision_error_max']:.3g}): the dtype cannot tell engine and trainer apart "
            f"there. {check['failing']} do not."
            if check["precision_error_max"] is not None else
            f"  {check['beyond_tol']} of {check['tokens']} tokens exceed the tolerance (no float64 "
            f"reference was computed to tell rounding from a real difference)."
        )
    lines.append(f"Settings to use: {PARITY_SETTINGS}.")
    return "\n".join(lines), passed


def tolerance_check(last_rung: list[RungResult], tol: float) -> dict:
    """Token by token: |Δ| <= tol, or <= tol + 2 × the trainer's own error vs float64.

    Each of two correct implementations in one dtype sits within its rounding error of the exact
    value, so they may differ by twice that; tokens beyond it are real disagreements.
    """
    import torch

    from parityrl.trainer.precision import within_precision

    tokens = beyond = failing = 0
    worst: float | None = None
    for r in last_rung:
        diffs = torch.tensor(r.abs_diffs, dtype=torch.float64)
        if r.precision_error is None:
            ok = diffs <= tol
        else:
            errors = torch.tensor(r.precision_error, dtype=torch.float64)
            ok = within_precision(diffs, errors, tol)
            worst = max(worst or 0.0, errors.max().item() if errors.numel() else 0.0)
        tokens += diffs.numel()
        beyond += int((diffs > tol).sum())
        failing += int((~ok).sum())
    return {"tokens": tokens, "beyond_tol": beyond, "failing": failing,
            "precision_error_max": worst}


def to_json(results: list[RungResult], floor: dict, text: str, passed: bool, extra: dict) -> dict:
    return {
        "rungs": [
            {"name": r.name, "layer": r.layer, "settings": r.settings, "metrics": r.metrics,
             "weight_sync_check": r.sync_check, "weight_sync_ok": r.sync_ok,
             **({"precision_error_max": max(r.precision_error, default=0.0),
                 "precision_error_mean": sum(r.precision_error) / max(len(r.precision_error), 1)}
                if r.precision_error is not None else {})}
            for r in results
        ],
        "noise_floor": floor,
        "verdict": text,
        "passed": passed,
        **extra,
    }


def print_table(results: list[RungResult], floor: dict, console) -> None:
    from rich.table import Table

    table = Table(title="engine vs trainer token logprobs, Δ = trainer − engine (nats)")
    table.add_column("rung")
    for name in METRIC_NAMES:
        table.add_column(SHORT_NAMES[name], justify="right")
    table.add_column("sync", justify="center")
    for r in results:
        sync = "" if r.sync_ok is None else ("ok" if r.sync_ok else "[red]BROKEN[/red]")
        table.add_row(r.name, *[_fmt(r.metrics[n]) for n in METRIC_NAMES], sync)
    if floor:
        table.add_row("[dim]trainer vs itself[/dim]", *[_fmt(floor[n]) for n in METRIC_NAMES], "")
    console.print(table)


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.2e}"


def write_report(results: list[RungResult], floor: dict, text: str, passed: bool,
                 out_dir: Path, header: dict) -> Path:
    """Markdown report plus two PNG plots in `out_dir`; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_histograms(results, out_dir / "abs_diff_hist.png")
    _plot_positions(results, out_dir / "abs_diff_by_position.png")
    lines = [f"# parityrl doctor: {'PASS' if passed else 'FAIL'}", ""]
    lines += [f"> {line}" for line in text.splitlines()] + [""]
    lines += ["| " + " | ".join(f"{k}" for k in header) + " |",
              "|" + "---|" * len(header), "| " + " | ".join(str(v) for v in header.values()) + " |",
              ""]
    cols = ["rung"] + [n.removeprefix("mismatch/") for n in METRIC_NAMES] + ["weight sync"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        sync = "" if r.sync_ok is None else ("ok" if r.sync_ok else "BROKEN")
        lines.append("| " + " | ".join([r.name, *[_fmt(r.metrics[n]) for n in METRIC_NAMES],
                                         sync]) + " |")
    if floor:
        lines.append("| trainer noise floor | "
                     + " | ".join(_fmt(floor[n]) for n in METRIC_NAMES) + " | |")
    lines += ["", "![|Δ| per rung](abs_diff_hist.png)", "",
              "![|Δ| by completion position](abs_diff_by_position.png)", ""]
    lines += ["## Resolved settings per rung", "", "```json",
              json.dumps({r.name: r.settings for r in results}, indent=2), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


SHORT_NAMES = {
    "mismatch/mean_diff": "mean Δ",
    "mismatch/mean_abs_diff": "mean |Δ|",
    "mismatch/p99_abs_diff": "p99 |Δ|",
    "mismatch/max_abs_diff": "max |Δ|",
    "mismatch/kl_k1": "kl k1",
    "mismatch/kl_k3": "kl k3",
    "mismatch/clip_frac@0.2": "clip@0.2",
}

FLOOR = 1e-9  # |Δ| below this is drawn at this value on log axes


def _plot_histograms(results: list[RungResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(results), 1, figsize=(8, 1.9 * len(results)), sharex=True)
    bins = np.logspace(-9, 1, 51)
    for ax, r in zip(np.atleast_1d(axes), results):
        values = np.clip(np.asarray(r.abs_diffs), FLOOR, None)
        ax.hist(values, bins=bins, color="tab:blue")
        ax.set_xscale("log")
        ax.set_ylabel("tokens")
        ax.set_title(f"{r.name}: max |Δ| {r.metrics['mismatch/max_abs_diff']:.2e}", fontsize=9,
                     loc="left")
    np.atleast_1d(axes)[-1].set_xlabel("|Δ logprob| = |trainer − engine| (nats; exact matches drawn at 1e-9)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_positions(results: list[RungResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        pos = np.asarray(r.positions)
        diffs = np.asarray(r.abs_diffs)
        xs = np.unique(pos)
        ax.plot(xs, [max(diffs[pos == x].mean(), FLOOR) for x in xs], label=r.name, marker=".")
    ax.set_yscale("log")
    ax.set_xlabel("completion token position")
    ax.set_ylabel("mean |Δ logprob| (nats)")
    ax.set_title("engine vs trainer mismatch along the completion")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
