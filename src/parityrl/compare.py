"""`parityrl compare`: does a candidate run track a reference run, and if not, from when and where?

    parityrl compare runs/ref runs/cand --out cmp/ --gate

For every metric the reference's own step-to-step noise sets a band around its smoothed curve; the
candidate *diverges* at the first step where its smoothed curve stays outside that band for
`patience` steps in a row. Extra reference seeds (`--ref RUN`) widen the band to the spread between
them. It reads whatever the run directories hold, so runs still being written can be compared.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from parityrl.core.errors import UserError
from parityrl.runlog import read_metrics

DEFAULT_METRICS = ["rl/reward_mean", "rl/clip_frac", "rl/kl_k3", "rl/entropy", "rl/logprob_mean",
                   "mismatch/kl_k3", "lag/mean"]
UNITS = {"rl/reward_mean": "reward", "rl/clip_frac": "fraction of tokens", "rl/kl_k3": "nats",
         "rl/entropy": "nats", "rl/logprob_mean": "nats", "mismatch/kl_k3": "nats",
         "mismatch/max_abs_diff": "nats", "lag/mean": "optimizer steps"}
# Quantities near zero in a healthy run: plotted on a log axis.
LOG_SCALE = ("mismatch/", "rl/kl_k3")


@dataclass
class Run:
    path: Path
    rows: list[dict]
    settings: dict  # flattened config.yaml + engine_settings.json

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, metric: str) -> dict[int, float]:
        out = {}
        for row in self.rows:
            value = row.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value) and "step" in row:
                out[int(row["step"])] = float(value)
        return out

    def samples_at(self) -> dict[int, float]:
        """Cumulative samples trained by each step (x axis 'samples')."""
        total, out = 0.0, {}
        for row in sorted(self.rows, key=lambda r: r.get("step", 0)):
            total += float(row.get("rl/samples") or 0.0)
            out[int(row.get("step", 0))] = total
        return out


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def load_run(path: Path) -> Run:
    if not path.is_dir():
        raise UserError(f"run directory not found: {path}")
    if not (path / "metrics.jsonl").exists():
        raise UserError(f"not a run directory (no metrics.jsonl): {path}")
    settings = {}
    if (path / "config.yaml").exists():
        settings.update(_flatten(yaml.safe_load((path / "config.yaml").read_text()) or {},
                                 "config."))
    if (path / "engine_settings.json").exists():
        settings.update(_flatten(json.loads((path / "engine_settings.json").read_text()),
                                 "engine."))
    return Run(path, read_metrics(path / "metrics.jsonl"), settings)


# Keys that differ between any two runs by construction.
_IDENTITY = ("config.name", "engine.model", "config.model")


def settings_diff(runs: list[Run]) -> dict[str, list]:
    # What vLLM resolved first (engine.*), then what the configs asked for (config.*).
    keys = sorted(set().union(*(r.settings for r in runs)),
                  key=lambda k: (not k.startswith("engine."), k))
    diff = {}
    for key in keys:
        values = [r.settings.get(key, "—") for r in runs]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1 and key not in _IDENTITY:
            diff[key] = values
    return diff


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (uses only steps up to t, so a divergence is not seen early)."""
    if window <= 1:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        out[i] = (cumsum[i + 1] - cumsum[lo]) / (i + 1 - lo)
    return out


@dataclass
class MetricResult:
    metric: str
    steps: list[int]
    reference: list[float]
    band: list[float]
    candidates: dict[str, list[float | None]] = field(default_factory=dict)
    diverged_at: dict[str, int | None] = field(default_factory=dict)
    note: str = ""


def noise_band(ref_smoothed: np.ndarray, ref_raw: np.ndarray, extra_refs: list[np.ndarray],
               window: int, k: float) -> np.ndarray:
    """Half-width of the band around the reference's smoothed curve, per step.

    From the reference alone: k × (its residual std around the smoothed curve) × sqrt(2/window),
    the spread expected between two smoothed noisy curves. With extra reference seeds the band is
    at least k/2 × their largest distance from the reference. A small floor absorbs float noise.
    """
    residual = ref_raw - ref_smoothed
    sigma = float(np.std(residual)) if len(residual) > 2 else 0.0
    band = np.full_like(ref_smoothed, k * sigma * math.sqrt(2.0 / max(window, 1)))
    for extra in extra_refs:
        band = np.maximum(band, 0.5 * k * np.abs(extra - ref_smoothed))
    return np.maximum(band, 1e-9 + 1e-3 * np.abs(ref_smoothed))


def compare_metric(metric: str, ref: Run, extra_refs: list[Run], cands: list[Run], window: int,
                   k: float, patience: int) -> MetricResult | None:
    ref_series = ref.series(metric)
    if not ref_series:
        return None
    steps = sorted(ref_series)
    ref_raw = np.array([ref_series[s] for s in steps])
    ref_s = smooth(ref_raw, window)
    extras = []
    for extra in extra_refs:
        series = extra.series(metric)
        common = [s for s in steps if s in series]
        if common:
            values = np.interp(steps, common, [series[s] for s in common])
            extras.append(smooth(values, window))
    band = noise_band(ref_s, ref_raw, extras, window, k)
    result = MetricResult(metric, steps, ref_s.tolist(), band.tolist())
    for cand in cands:
        series = cand.series(metric)
        common = [i for i, s in enumerate(steps) if s in series]
        if not common:
            result.candidates[cand.name] = [None] * len(steps)
            result.diverged_at[cand.name] = None
            result.note += f" {cand.name} has no values of it."
            continue
        idx = np.array(common)
        cand_s = smooth(np.array([series[steps[i]] for i in common]), window)
        values: list[float | None] = [None] * len(steps)
        for i, v in zip(common, cand_s):
            values[i] = float(v)
        result.candidates[cand.name] = values
        outside = np.abs(cand_s - ref_s[idx]) > band[idx]
        result.diverged_at[cand.name] = _first_run(outside, [steps[i] for i in common], patience)
    return result


def _first_run(flags: np.ndarray, steps: list[int], patience: int) -> int | None:
    count = 0
    for flag, step in zip(flags, steps):
        count = count + 1 if flag else 0
        if count >= max(1, min(patience, len(flags))):
            return steps[steps.index(step) - count + 1]
    return None


@dataclass
class Comparison:
    runs: list[Run]
    results: list[MetricResult]
    diff: dict[str, list]
    verdict: str
    diverged: bool


def compare_runs(ref_path: Path, cand_paths: list[Path], extra_ref_paths: list[Path] = (),
                 metrics: list[str] | None = None, window: int = 5, k: float = 4.0,
                 patience: int = 3) -> Comparison:
    ref = load_run(ref_path)
    extras = [load_run(p) for p in extra_ref_paths]
    cands = [load_run(p) for p in cand_paths]
    runs = [ref, *extras, *cands]
    ref_steps = {int(r["step"]) for r in ref.rows if "step" in r}
    for cand in cands:
        if not ref_steps & {int(r["step"]) for r in cand.rows if "step" in r}:
            raise UserError(f"no overlapping steps between {ref.path} and {cand.path}")
    wanted = metrics or DEFAULT_METRICS
    available = set().union(*(set(r) for run in runs for r in run.rows))
    if metrics:
        unknown = [m for m in metrics if m not in available]
        if unknown:
            raise UserError(f"unknown metric(s) {', '.join(unknown)}: not in any run's metrics")
    results = [res for m in wanted
               if (res := compare_metric(m, ref, extras, cands, window, k, patience)) is not None]
    diff = settings_diff(runs)
    verdict, diverged = _verdict(results, cands, diff)
    return Comparison(runs, results, diff, verdict, diverged)


def _verdict(results: list[MetricResult], cands: list[Run], diff: dict) -> tuple[str, bool]:
    lines, diverged = [], False
    for cand in cands:
        hits = sorted(((r.diverged_at[cand.name], r.metric) for r in results
                       if r.diverged_at.get(cand.name) is not None))
        if hits:
            diverged = True
            first_step = hits[0][0]
            named = ", ".join(f"{m} (step {s})" for s, m in hits)
            lines.append(f"{cand.name} DIVERGES from the reference from step {first_step}: {named}.")
        else:
            lines.append(f"{cand.name} tracks the reference on every compared metric.")
    if diff:
        shown = "; ".join(f"{k}: {' vs '.join(map(str, v))}" for k, v in list(diff.items())[:8])
        lines.append(f"Settings that differ ({len(diff)}): {shown}"
                     + (" …" if len(diff) > 8 else ""))
    return "\n".join(lines), diverged


def plot_metric(result: MetricResult, runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = runs[0]
    fig, (ax_step, ax_samples) = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = np.array(result.steps)
    ref_vals = np.array(result.reference)
    band = np.array(result.band)
    log = result.metric.startswith(LOG_SCALE)
    floor = 1e-15  # log axes: zero (exact parity) is drawn at the floor
    lift = (lambda v: np.maximum(v, floor)) if log else (lambda v: v)
    ref_label = ref.name if "reference" in ref.name else f"{ref.name} (reference)"
    for ax, xs in ((ax_step, steps), (ax_samples, _samples(ref, result.steps))):
        ax.plot(xs, lift(ref_vals), label=ref_label, color="black", linewidth=1.6)
        ax.fill_between(xs, lift(ref_vals - band), lift(ref_vals + band), color="gray",
                        alpha=0.25, label="reference noise band")
        for run in runs[1:]:
            values = result.candidates.get(run.name)
            if values is None:
                continue
            x_run = xs
            ys = np.array([np.nan if v is None else v for v in values])
            ax.plot(x_run, lift(ys), label=run.name, linewidth=1.2)
            step = result.diverged_at.get(run.name)
            if step is not None:
                ax.axvline(xs[result.steps.index(step)], color="red", linestyle="--",
                           linewidth=0.8)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_ylabel(f"{result.metric} ({UNITS.get(result.metric, 'value')})")
    ax_step.set_xlabel("optimizer step")
    ax_samples.set_xlabel("samples trained (reference run)")
    ax_step.legend(fontsize=7)
    fig.suptitle(f"{result.metric} (smoothed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _samples(run: Run, steps: list[int]) -> np.ndarray:
    at = run.samples_at()
    return np.array([at.get(s, np.nan) for s in steps])


def write_report(comparison: Comparison, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    names = [r.name for r in comparison.runs]
    lines = [f"# parityrl compare: {'DIVERGES' if comparison.diverged else 'TRACKS'}", ""]
    lines += [f"> {line}" for line in comparison.verdict.splitlines()] + [""]
    lines += [f"Reference: `{comparison.runs[0].path}`; compared: "
              + ", ".join(f"`{r.path}`" for r in comparison.runs[1:]), ""]
    cands = [r for r in comparison.runs[1:] if any(r.name in m.candidates
                                                   for m in comparison.results)]
    lines += ["| metric | " + " | ".join(f"{c.name}: first diverging step" for c in cands) + " |",
              "|---|" + "---|" * len(cands)]
    for res in comparison.results:
        cells = [str(res.diverged_at.get(c.name) or "—") for c in cands]
        lines.append(f"| {res.metric} | " + " | ".join(cells) + " |")
    lines += ["", "## Settings that differ", ""]
    if comparison.diff:
        lines += ["| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {k} | " + " | ".join(f"`{v}`" for v in values) + " |"
                  for k, values in comparison.diff.items()]
    else:
        lines.append("None: the runs share every resolved engine and trainer setting.")
    lines += ["", "## Curves", ""]
    for res in comparison.results:
        png = res.metric.replace("/", "_").replace("@", "at") + ".png"
        plot_metric(res, comparison.runs, out / png)
        lines += [f"![{res.metric}]({png})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "comparison.json").write_text(json.dumps({
        "verdict": comparison.verdict, "diverged": comparison.diverged,
        "settings_diff": comparison.diff,
        "metrics": {r.metric: {"diverged_at": r.diverged_at, "note": r.note.strip()}
                    for r in comparison.results},
    }, indent=2, default=str))
    return path
