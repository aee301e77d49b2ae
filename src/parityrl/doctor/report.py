"""What the doctor says: a table, the verdict, JSON, a Markdown report with plots.

Nothing non-finite is printed as a number or written to JSON: such a value becomes null and is
named in the JSON's `nonfinite` list (the verdict already counts non-finite tokens).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from parityrl.doctor.rungs import BASELINE, RungResult
from parityrl.doctor.verdict import Verdict, consistency, judge
from parityrl.core.mismatch import METRIC_NAMES
from parityrl.core.sampling import SamplingConfig

# The settings of the last rung, as a user writes them in a run config (and as vLLM calls them).
PARITY_SETTINGS = [
    ("engine.logprobs_mode: processed_logprobs", "logprobs_mode='processed_logprobs'"),
    ("engine.enable_prefix_caching: false", "enable_prefix_caching=False"),
    ("engine.enable_chunked_prefill: false", "enable_chunked_prefill=False"),
    ("engine.async_scheduling: false", "async_scheduling=False"),
    ("engine.enforce_eager: true", "enforce_eager=True"),
    ("engine.lm_head_dtype: float32 with trainer.fp32_lm_head: true",
     "hf_overrides={'head_dtype': 'float32'}"),
    ("seed: <fixed>", "seed=<fixed>"),
]
# Resolved settings that say nothing about numerics (left out of the per-rung change lists).
_NOT_NUMERICS = {"vllm_version", "device", "model", "kv_cache_memory_bytes", "max_num_seqs",
                 "max_num_batched_tokens", "max_model_len", "worker_extension_cls",
                 "trainer_dtype", "chat_template"}


def by_sampling(results: list[RungResult]) -> list[tuple[SamplingConfig, list[RungResult]]]:
    groups: dict[SamplingConfig, list[RungResult]] = {}
    for r in results:
        groups.setdefault(r.sampling, []).append(r)
    return list(groups.items())


def judge_all(results: list[RungResult], floor: dict, dtype: str,
              tol: float | None = None) -> tuple[bool, list[Verdict]]:
    verdicts = [judge(rungs, floor, dtype, tol) for _, rungs in by_sampling(results)]
    return all(v.passed for v in verdicts), verdicts


def changes(prev: RungResult | None, cur: RungResult) -> dict[str, list]:
    """Numerics settings that differ from the previous rung, as resolved by vLLM."""
    if prev is None:
        return {}
    return {k: [prev.settings.get(k), v] for k, v in cur.settings.items()
            if k not in _NOT_NUMERICS and prev.settings.get(k) != v}


def baseline_notes(settings: dict) -> list[str]:
    """What vLLM's defaults resolved to, and which of them this backend overrides."""
    notes = [f"logprobs_mode={settings['logprobs_mode']}, enable_prefix_caching="
             f"{settings['enable_prefix_caching']}, enable_chunked_prefill="
             f"{settings['enable_chunked_prefill']}, head_dtype={settings['head_dtype']}, "
             f"enforce_eager={settings['enforce_eager']} (compilation_mode "
             f"{settings['compilation_mode']}), generation_config={settings['generation_config']}, "
             f"seed={settings['seed']}"]
    if settings.get("device") == "cpu" and settings.get("async_scheduling") is False:
        notes.append("async_scheduling=False: vLLM's default turns it on where supported; the "
                     "CPU platform forces it off (vllm/platforms/cpu.py)")
    defaults = settings.get("generation_config_sampling_defaults")
    notes.append(f"sampling defaults from the model folder's generation_config.json: "
                 f"{defaults if defaults else 'none set'}")
    return notes


def clean(value):
    """`value` with every non-finite float replaced by None (JSON has no inf or NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def _nonfinite_paths(value, path: str = "") -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [path or "."]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nonfinite_paths(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _nonfinite_paths(v, f"{path}[{i}]")]
    return []


def to_json(results: list[RungResult], floor: dict, verdicts: list[Verdict], passed: bool,
            extra: dict) -> dict:
    rungs = []
    for _, group in by_sampling(results):
        for prev, r in zip([None, *group], group):
            state = consistency(r)
            rungs.append({
                "name": r.name, "layer": r.layer, "sampling": r.sampling.model_dump(mode="json"),
                "withheld": list(r.withheld), "changes": changes(prev, r),
                "settings": r.settings, "metrics": r.metrics,
                "engine_error": r.engine_error, "trainer_error": r.trainer_error,
                "consistent": state.ok, "consistency": state.why,
                "weight_sync_check": r.sync_check, "weight_sync_ok": r.sync_ok,
                **({"baseline_notes": baseline_notes(r.settings)} if r.name == BASELINE else {}),
            })
    data = {"rungs": rungs, "noise_floor": floor, "passed": passed,
            "verdict": "\n".join(v.text for v in verdicts),
            "verdict_sentences": [v.sentence for v in verdicts],
            "culprits": [v.culprit for v in verdicts if v.culprit], **extra}
    return clean(data) | {"nonfinite": _nonfinite_paths(data)}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


SHORT_NAMES = {
    "mismatch/mean_diff": "mean Δ",
    "mismatch/mean_abs_diff": "mean |Δ|",
    "mismatch/p99_abs_diff": "p99 |Δ|",
    "mismatch/max_abs_diff": "max |Δ|",
    "mismatch/kl_k1": "kl k1",
    "mismatch/kl_k3": "kl k3",
    "mismatch/clip_frac@0.2": "clip@0.2",
}
EXTRA_COLUMNS = ["nucleus", "engine err", "trainer err", "consistent", "sync"]


def _row(r: RungResult) -> list[str]:
    state = consistency(r)
    name = r.name + (f" (withheld: {', '.join(r.withheld)})" if r.withheld else "")
    return [name, *[_fmt(r.metrics[n]) for n in METRIC_NAMES],
            _fmt(r.metrics.get("mismatch/nucleus_boundary_frac")),
            _fmt(r.engine_error["mean"]) if r.engine_error else "",
            _fmt(r.trainer_error["mean"]) if r.trainer_error else "",
            "yes" if state.ok else "NO",
            "" if r.sync_ok is None else ("ok" if r.sync_ok else "BROKEN")]


def print_table(results: list[RungResult], floor: dict, console) -> None:
    from rich.table import Table

    for sampling, group in by_sampling(results):
        table = Table(title=f"engine vs trainer token logprobs, Δ = trainer − engine (nats); "
                            f"{_sampling_label(sampling)}; errors are mean |lp − lp_float64|")
        table.add_column("rung")
        for name in METRIC_NAMES:
            table.add_column(SHORT_NAMES[name], justify="right")
        for col in EXTRA_COLUMNS:
            table.add_column(col, justify="right")
        for r in group:
            table.add_row(*_row(r))
        if floor:
            table.add_row("[dim]trainer vs itself[/dim]", *[_fmt(floor.get(n)) for n in METRIC_NAMES],
                          "", "", "", "", "")
        console.print(table)
        for prev, r in zip(group, group[1:]):
            diff = changes(prev, r)
            console.print(f"  {r.name}: " + (", ".join(f"{k} {a} → {b}" for k, (a, b) in diff.items())
                                            or "no engine setting changed"), highlight=False)
    console.print(f"  {BASELINE} (what vLLM resolved): "
                  + "; ".join(baseline_notes(results[0].settings)), highlight=False)


def _sampling_label(s: SamplingConfig) -> str:
    return f"T={s.temperature:g}, top_p={s.top_p:g}, top_k={s.top_k}"


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return "non-finite"
    return f"{x:.2e}"


def advice() -> str:
    return "Settings to use: " + "; ".join(f"{ours} (vLLM: {theirs})" for ours, theirs in PARITY_SETTINGS)


def write_report(results: list[RungResult], floor: dict, verdicts: list[Verdict], passed: bool,
                 out_dir: Path, header: dict) -> Path:
    """Markdown report plus two PNG plots in `out_dir`; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_histograms(results, out_dir / "abs_diff_hist.png")
    _plot_positions(results, out_dir / "abs_diff_by_position.png")
    lines = [f"# parityrl doctor: {'PASS' if passed else 'FAIL'}", ""]
    for v in verdicts:
        lines += [f"> {line}" for line in v.lines] + [""]
    lines += [f"> {advice()}", ""]
    lines += ["| " + " | ".join(f"{k}" for k in header) + " |",
              "|" + "---|" * len(header), "| " + " | ".join(str(v) for v in header.values()) + " |",
              ""]
    cols = ["rung"] + [n.removeprefix("mismatch/") for n in METRIC_NAMES] + EXTRA_COLUMNS
    for sampling, group in by_sampling(results):
        lines += [f"### {_sampling_label(sampling)}", ""]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_row(r)) + " |" for r in group]
        if floor:
            lines.append("| trainer vs itself | " + " | ".join(_fmt(floor.get(n)) for n in METRIC_NAMES)
                         + " |" * len(EXTRA_COLUMNS) + " |")
        lines += [""]
        for prev, r in zip(group, group[1:]):
            diff = changes(prev, r)
            lines.append(f"- **{r.name}** changed: " + (", ".join(
                f"`{k}` {a} → {b}" for k, (a, b) in diff.items()) or "no engine setting"))
        lines += [""]
    lines += [f"**{BASELINE}** is what vLLM resolved when given nothing but the model, dtype and "
              "resource limits:", ""] + [f"- {n}" for n in baseline_notes(results[0].settings)]
    lines += ["", "![|Δ| per rung](abs_diff_hist.png)", "",
              "![|Δ| by completion position](abs_diff_by_position.png)", ""]
    lines += ["## Resolved settings per rung", "", "```json",
              json.dumps(clean({r.name: r.settings for r in results}), indent=2), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


FLOOR = 1e-9  # |Δ| below this is drawn at this value on log axes


def _finite(values):
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def _plot_histograms(results: list[RungResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(results), 1, figsize=(8, 1.9 * len(results)), sharex=True)
    bins = np.logspace(-9, 1, 51)
    for ax, r in zip(np.atleast_1d(axes), results):
        ax.hist(np.clip(_finite(r.abs_diffs), FLOOR, None), bins=bins, color="tab:blue")
        ax.set_xscale("log")
        ax.set_ylabel("tokens")
        ax.set_title(f"{r.name} ({_sampling_label(r.sampling)}): max |Δ| "
                     f"{_fmt(r.metrics['mismatch/max_abs_diff'])}", fontsize=9, loc="left")
    np.atleast_1d(axes)[-1].set_xlabel(
        f"|Δ logprob| = |trainer − engine| (nats; values below {FLOOR:g}, exact matches included, "
        f"drawn at {FLOOR:g})")
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
        diffs = np.asarray(r.abs_diffs, dtype=float)
        keep = np.isfinite(diffs)
        pos, diffs = pos[keep], diffs[keep]
        xs = np.unique(pos)
        ax.plot(xs, [max(diffs[pos == x].mean(), FLOOR) for x in xs], marker=".",
                label=f"{r.name} ({_sampling_label(r.sampling)})")
    ax.set_yscale("log")
    ax.set_xlabel("completion token position")
    ax.set_ylabel(f"mean |Δ logprob| (nats; floor {FLOOR:g})")
    ax.set_title("engine vs trainer mismatch along the completion")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
