"""What one doctor run found (`parityrl.doctor.run` returns it): PASS or FAIL, what the command line
prints, the JSON and the Markdown report. The ladder's and the dtype table's, one type each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from parityrl.doctor import report
from parityrl.doctor.dtypes import PrecisionRow, summary_line, table_lines
from parityrl.doctor.multiturn import MultiTurnResult
from parityrl.doctor.rungs import RungResult
from parityrl.doctor.sampler import SamplerResult, verdict_lines
from parityrl.doctor.sampler import to_json as sampler_json
from parityrl.doctor.verdict import Verdict


class DoctorReport(ABC):
    """A doctor run's outcome; `passed` is its verdict (exit status 0), else it failed (1)."""

    passed: bool

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    @abstractmethod
    def print(self, console) -> None:
        """Everything the run found, on a rich console (the command line's output)."""

    @abstractmethod
    def to_json(self) -> dict:
        """The results as JSON data (non-finite numbers as null)."""

    @abstractmethod
    def write_report(self, folder: Path) -> Path:
        """A Markdown report (with its plots) in `folder`; returns the report's path."""

    def write_json(self, path: Path) -> None:
        report.write_json(path, self.to_json())


@dataclass
class LadderReport(DoctorReport):
    """The ladder's rungs, their verdicts, and the multi-turn and sampler checks run on them."""

    results: list[RungResult]  # one per rung and sampling, in ladder order
    floor: dict  # the trainer against itself
    verdicts: list[Verdict]  # one per sampling
    passed: bool  # every verdict and every check passed
    header: dict  # the run's settings: the JSON's "config", the Markdown report's table
    lora: bool = False  # measured with a LoRA adapter: say what it was and what it did
    turns: list[MultiTurnResult] | None = None  # the multi-turn check's; None: not asked for
    samplers: list[list[SamplerResult]] = field(default_factory=list)  # one list per sampling

    def print(self, console) -> None:
        report.print_table(self.results, self.floor, console)
        for v in self.verdicts:
            console.print(v.text, highlight=False)
        if self.lora:
            console.print(_lora_line(self.results[-1]), highlight=False)
        for check in self.turns or []:
            console.print("\n".join(check.lines()), highlight=False)
        for checked in self.samplers:
            console.print("\n".join(verdict_lines(checked)), highlight=False)
        console.print(report.advice(), highlight=False)

    def to_json(self) -> dict:
        extra: dict = {"config": self.header}
        if self.turns is not None:
            extra["multi_turn"] = [{"passed": c.passed, "why": c.consistency.why,
                                    "metrics": c.result.metrics, "episodes": c.episodes,
                                    "template_mismatches": c.unfaithful} for c in self.turns]
        if self.samplers:
            extra["sampler"] = [sampler_json(checked) for checked in self.samplers]
        return report.to_json(self.results, self.floor, self.verdicts, self.passed, extra)

    def write_report(self, folder: Path) -> Path:
        return report.write_report(self.results, self.floor, self.verdicts, self.passed, folder,
                                   self.header)


def _lora_line(last: RungResult) -> str:
    """What the doctor's adapter was and did, at the last rung."""
    lora, engine = last.settings["trainer_lora"], last.settings.get("lora") or {}
    effect = last.metrics.get("lora/adapter_effect_mean_abs", float("nan"))
    return (f"LoRA: a random rank-{lora['rank']} adapter (alpha {lora['alpha']:g}) on "
            f"{', '.join(lora['targets'])}; it moves the trainer's logprobs by mean |Δ| "
            f"{effect:.3g} from the base model's; the engine holds it in {engine.get('lora_dtype')}"
            f" slots of rank {engine.get('max_lora_rank')} "
            f"(weight sync check: {last.sync_check or 'not pushed at this rung'}).")


@dataclass
class DtypesReport(DoctorReport):
    """`--compare-dtypes`: the ladder's last rung in each dtype, one table row each."""

    rows: list[PrecisionRow]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def lines(self) -> list[str]:
        """The table, bfloat16 against float16, and each dtype's verdict (plain text)."""
        return (table_lines(self.rows) + ["", summary_line(self.rows)]
                + [f"{row.dtype}: {row.verdict}" for row in self.rows])

    def print(self, console) -> None:
        console.print("\n".join(self.lines()), highlight=False, markup=False)

    def to_json(self) -> dict:
        return report.clean({"precision": [row.cells() for row in self.rows],
                             "verdicts": {row.dtype: row.verdict for row in self.rows}})

    def write_report(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "precision.md"
        path.write_text("\n".join(self.lines()) + "\n")
        return path
