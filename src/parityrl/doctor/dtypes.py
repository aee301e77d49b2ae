"""The doctor's precision table (`parityrl doctor --compare-dtypes`): which dtype to train in.

"Defeating the Training-Inference Mismatch via FP16" (arXiv 2510.26788) reports that float16 on
both sides shrinks the engine/trainer mismatch by about an order of magnitude against bfloat16.
This answers that question on the user's own model: the ladder's last rung (every fix applied,
the trainer's weights moved and pushed) once per dtype, both sides in that dtype, each with its own
engine, and one row per dtype:

    engine error, trainer error     |lp − lp_float64| (mean, p99) of the same weights in float64
    mismatch                        |lp_trainer − lp_engine| mean and max, KL k3
    ratio outside [0.8, 1.25]       share of tokens whose exp(lp_trainer − lp_engine) leaves it
                                    (|Δ| > ln 1.25, the interval is symmetric in log space)
    verdict                         the rung judged by the doctor's rule (doctor/verdict.py)

Each dtype samples its own rollouts (the engines differ), from the same prompts and seeds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from parityrl.doctor.ladder import run_ladder
from parityrl.doctor.rungs import LadderConfig, RungResult, build_ladder
from parityrl.doctor.verdict import judge

DTYPES = ("float32", "bfloat16", "float16")
RATIO_BOUNDS = (0.8, 1.25)
_LOG_BOUND = math.log(RATIO_BOUNDS[1])  # ln 1.25 = −ln 0.8


@dataclass
class PrecisionRow:
    dtype: str
    result: RungResult  # the last rung in this dtype
    passed: bool
    verdict: str  # the verdict's sentence

    @property
    def ratio_outside(self) -> float:
        diffs = self.result.abs_diffs
        return sum(d > _LOG_BOUND or not math.isfinite(d) for d in diffs) / max(len(diffs), 1)

    def cells(self) -> dict:
        m, e, t = self.result.metrics, self.result.engine_error, self.result.trainer_error
        return {
            "dtype": self.dtype, "tokens": int(m["mismatch/tokens"]),
            "engine_error_mean": e and e["mean"], "engine_error_p99": e and e["p99"],
            "trainer_error_mean": t and t["mean"], "trainer_error_p99": t and t["p99"],
            "mismatch_mean_abs": m["mismatch/mean_abs_diff"],
            "mismatch_max_abs": m["mismatch/max_abs_diff"], "kl_k3": m["mismatch/kl_k3"],
            "ratio_outside_0.8_1.25": self.ratio_outside, "passed": self.passed,
        }


async def compare_dtypes(cfg: LadderConfig, dtypes: tuple[str, ...] = DTYPES,
                         on_row: Callable[[PrecisionRow], None] | None = None
                         ) -> list[PrecisionRow]:
    """The last rung once per dtype (one engine start each); `cfg.dtype` is ignored."""
    rows = []
    for dtype in dtypes:
        per_dtype = dataclasses.replace(cfg, dtype=dtype)
        results, floor = await run_ladder(per_dtype, rungs=build_ladder(cfg.withhold)[-1:])
        for result in results:  # one per sampling
            verdict = judge([result], floor, dtype, cfg.tol)
            row = PrecisionRow(dtype, result, verdict.passed, verdict.sentence)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def table_lines(rows: list[PrecisionRow]) -> list[str]:
    """The table as Markdown (the docs and the terminal show the same text)."""
    lines = ["| dtype | tokens | engine vs fp64 mean / p99 | trainer vs fp64 mean / p99 | "
             "mismatch mean \\|Δ\\| | max \\|Δ\\| | KL k3 | ratio outside [0.8, 1.25] | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        c = row.cells()
        lines.append(
            f"| {c['dtype']} | {c['tokens']} | {_fmt(c['engine_error_mean'])} / "
            f"{_fmt(c['engine_error_p99'])} | {_fmt(c['trainer_error_mean'])} / "
            f"{_fmt(c['trainer_error_p99'])} | {_fmt(c['mismatch_mean_abs'])} | "
            f"{_fmt(c['mismatch_max_abs'])} | {_fmt(c['kl_k3'])} | "
            f"{c['ratio_outside_0.8_1.25']:.2%} | {'PASS' if row.passed else 'FAIL'} |")
    return lines


def summary_line(rows: list[PrecisionRow]) -> str:
    """bfloat16's mismatch against float16's (the paper's question), in one line."""
    by = {r.dtype: r.result.metrics for r in rows}
    if "bfloat16" not in by or "float16" not in by:
        return ""

    def times(key: str) -> str:
        low = by["float16"][key]
        return f"{by['bfloat16'][key] / low:.3g}×" if low else "∞×"

    return (f"bfloat16 against float16: mean |Δ| {times('mismatch/mean_abs_diff')}, max |Δ| "
            f"{times('mismatch/max_abs_diff')}, KL k3 {times('mismatch/kl_k3')} "
            f"(arXiv 2510.26788 reports about an order of magnitude)")
