"""One doctor run, as `parityrl doctor` runs it: `run(DoctorConfig(...), progress)` reads the
prompts, resolves the model, climbs the ladder (or, with compare_dtypes, runs its last rung in each
dtype), judges, and returns a DoctorReport that says PASS or FAIL and prints and writes itself.

Progress goes through a `Progress` object: which step runs now, each step's mismatch when done,
messages and warnings as they happen (the command line shows them with a spinner).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable, Protocol

from parityrl.core.errors import UserError
from parityrl.doctor.config import DoctorConfig
from parityrl.doctor.dtypes import DTYPES, PrecisionRow, compare_dtypes
from parityrl.doctor.ladder import run_ladder_sync
from parityrl.doctor.outcome import DoctorReport, DtypesReport, LadderReport
from parityrl.doctor.report import judge_all
from parityrl.doctor.reward import run_reward_check
from parityrl.doctor.rungs import LadderConfig, Rung, RungResult, build_ladder
from parityrl.hardware import bfloat16_warning
from parityrl.models.builtin import resolve_model
from parityrl.models.load import check_model_folder, has_experts
from parityrl.models.tokenizer import load_tokenizer
from parityrl.tasks.prompt_file import read_prompts
from parityrl.tasks.prompts import Messages, has_chat_template

__all__ = ["DoctorReport", "Progress", "run"]


class Progress(Protocol):
    def say(self, text: str) -> None:
        """A message as it happens (a built-in model being built)."""

    def warn(self, text: str) -> None:
        """A warning as it happens (bfloat16 emulated on this CPU)."""

    def status(self, text: str) -> None:
        """What runs from now on (until the next status)."""

    def done(self, text: str) -> None:
        """A step finished (a rung, a dtype): its name and mismatch in one line."""


class Silent:
    """Progress that shows nothing: `run`'s default."""

    def say(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass

    def done(self, text: str) -> None:
        pass


def run(config: DoctorConfig, progress: Progress | None = None) -> DoctorReport:
    """Measure what `config` asks for; bad input (a prompts file, a model folder, a model without
    the chat template --multi-turn needs) is a UserError before any engine starts."""
    progress = progress or Silent()
    if config.reward_model is not None:
        return run_reward_check(config, progress)
    prompts = read_prompts(config.prompts) if config.prompts else None
    folder = check_model_folder(resolve_model(config.model, say=progress.say))
    warning = bfloat16_warning("bfloat16" if config.compare_dtypes else config.dtype)
    if warning:
        progress.warn(warning)
    ladder = _ladder_config(config, folder, prompts)
    if config.compare_dtypes:
        return _compare_dtypes(ladder, progress)
    return _climb(config, ladder, folder, progress)


def _ladder_config(config: DoctorConfig, folder: Path,
                   prompts: list[str | Messages] | None) -> LadderConfig:
    return LadderConfig(model=str(folder), dtype=config.dtype, samplings=[config.sampling],
                        num_samples=config.num_samples, seed=config.seed, tol=config.tol,
                        chat_template=config.chat_template, withhold=frozenset(config.withhold),
                        weight_transport=config.weight_transport, lora_rank=config.lora,
                        **({"prompts": prompts} if prompts else {}))


def _climb(config: DoctorConfig, ladder: LadderConfig, folder: Path,
           progress: Progress) -> LadderReport:
    """The ladder (its last rung alone with quick), the checks on it, and the verdict."""
    rungs = build_ladder(ladder.withhold, config.bitwise, moe=has_experts(folder))
    if config.quick:  # the settings to use (and the bitwise rung after them)
        rungs = rungs[-2:] if config.bitwise else rungs[-1:]
    if config.multi_turn and (config.chat_template is False
                              or not has_chat_template(load_tokenizer(str(folder)))):
        raise UserError("--multi-turn renders observations with the chat template, and this "
                        "model's tokenizer has none (or --no-chat-template was given)")
    turns: list = []  # the multi-turn check's results, after the last rung
    samplers: list = []  # the sampler check's results (one list per sampling)
    on_rung = _rung_progress(config, rungs, progress)
    results, floor = run_ladder_sync(ladder, on_rung, rungs,
                                     turns.append if config.multi_turn else None,
                                     samplers.append if config.sampler_draws else None,
                                     config.sampler_draws)
    passed, verdicts = judge_all(results, floor, config.dtype, config.tol)
    passed = (passed and all(check.passed for check in turns)
              and all(r.passed for checked in samplers for r in checked))
    header = {"model": config.model, "dtype": config.dtype, "temperature": config.temperature,
              "top_p": config.top_p, "top_k": config.top_k,
              "chat_template": results[0].settings["chat_template"],
              "samples": f"{len(ladder.prompts)}×{config.num_samples}",
              "max_tokens": config.max_tokens,
              "rule": f"--tol {config.tol:g}" if config.tol is not None else "float64 reference"}
    return LadderReport(results, floor, verdicts, passed, header, lora=bool(config.lora),
                        turns=turns if config.multi_turn else None, samplers=samplers)


def _mismatch(name: str, metrics: dict) -> str:
    return (f"{name}: mean |Δ| {metrics['mismatch/mean_abs_diff']:.2e}, max |Δ| "
            f"{metrics['mismatch/max_abs_diff']:.2e}")


def _rung_progress(config: DoctorConfig, rungs: list[Rung],
                   progress: Progress) -> Callable[[RungResult], None]:
    """Says that the first rung starts; the callback says each rung's mismatch, then what runs
    next: the next rung, or the checks on the last default rung's engine."""
    progress.status(f"rung 1/{len(rungs)}: {rungs[0].name} (starting vLLM engine)")
    checked = rungs[-1 - config.bitwise].name  # the rung whose engine the checks run on
    done: list[RungResult] = []

    def on_rung(result: RungResult) -> None:
        done.append(result)
        progress.done(_mismatch(result.name, result.metrics))
        if len(done) < len(rungs):
            progress.status(f"rung {len(done) + 1}/{len(rungs)}: {rungs[len(done)].name}")
        if config.multi_turn and result.name == checked:
            progress.status("multi-turn check: two-turn episodes on this rung's engine")
        elif config.multi_turn and result.name == "bitwise":
            progress.status("multi-turn check: three-turn episodes scored with the kernels")
        elif config.sampler_draws and result.name == checked:
            progress.status(f"sampler check: {config.sampler_draws} one-token draws a prompt")

    return on_rung


def _compare_dtypes(ladder: LadderConfig, progress: Progress) -> DtypesReport:
    """The last rung in each dtype, one engine each (`--compare-dtypes`)."""
    rows: list[PrecisionRow] = []
    progress.status(f"{DTYPES[0]}: the last rung (starting vLLM engine)")

    def on_row(row: PrecisionRow) -> None:
        rows.append(row)
        progress.done(_mismatch(row.dtype, row.result.metrics))
        if len(rows) < len(DTYPES):
            progress.status(f"{DTYPES[len(rows)]}: the last rung (starting vLLM engine)")

    asyncio.run(compare_dtypes(ladder, on_row=on_row))
    return DtypesReport(rows)
