"""`parityrl doctor --reward-model PATH`: does the reward engine score what transformers scores?

The same token ids (TRL's texts: prompt + completion, or the conversation through the reward
model's chat template, tokenized without special tokens) are scored on a vLLM pooling engine
and by transformers in float32 and float64. PASS: the engine's largest |Δ| against float32 is at
most the tolerance (1e-5 in float32) and every group ranks its completions alike. A FAIL names
what differs, when the numbers say it: an activation on one side only (vLLM applies a sigmoid to
a one-label score unless told not to; TRL rewards with the raw logit), the dtype. Whatever the
verdict, it says what a text tokenized with special tokens added would change (a template
difference: the ids must be the same on both sides).
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from parityrl.core.errors import UserError
from parityrl.doctor.config import DoctorConfig
from parityrl.doctor.outcome import DoctorReport
from parityrl.doctor.report import write_json
from parityrl.engine.pooling import PoolingEngine
from parityrl.models.builtin import resolve_model
from parityrl.models.tokenizer import load_tokenizer
from parityrl.rewards.config import ServingEngine
from parityrl.rewards.reward_model import (ReferenceRewardModel, check_reward_model_folder,
                                           pooling_settings)
from parityrl.rewards.texts import encode_texts, reward_texts
from parityrl.tasks.base import Problem
from parityrl.tasks.prompts import as_messages, has_chat_template

TOL = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 5e-3}
# Groups of completions to one prompt: right, near misses, nonsense.
DEFAULT_GROUPS = [
    ("123+4=", ["127", "128", "117", "12x"]),
    ("305+9=", ["314", "313", "324", "3"]),
    ("48+7=", ["55", "56", "45", "555"]),
    ("Name a prime number.", [" 7", " 9", " 13", " banana"]),
    ("What is the capital of France?", [" Paris", " Lyon", " London", " paris, of course"]),
]


@dataclass
class RewardCheck(DoctorReport):
    header: dict
    diffs: dict[str, dict[str, float]]  # comparison → {"max": …, "mean": …}
    rankings_agree: list[bool]  # per group: the engine orders its completions as float32 does
    passed: bool
    findings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"reward model {self.header['reward_model']} ({self.header['texts']} texts, "
               f"{self.header['dtype']}; activation: engine {self.header['engine_activation']}, "
               f"reference {self.header['activation']})"]
        out += [f"  {name:<34} max |Δ| {d['max']:.2e}   mean |Δ| {d['mean']:.2e}"
                for name, d in self.diffs.items()]
        agree = sum(self.rankings_agree)
        out.append(f"  rankings inside groups: {agree} of {len(self.rankings_agree)} agree")
        out += [f"  - {f}" for f in self.findings]
        out.append(("PASS" if self.passed else "FAIL") + f": engine vs transformers float32 "
                   f"max |Δ| {self.diffs['engine vs transformers float32']['max']:.2e} "
                   f"(tolerance {self.header['tol']:g})")
        return out

    def print(self, console) -> None:
        console.print("\n".join(self.lines()), highlight=False)

    def to_json(self) -> dict:
        return {"config": self.header, "diffs": self.diffs, "rankings_agree": self.rankings_agree,
                "findings": self.findings, "passed": self.passed}

    def write_report(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "reward_model.md"
        path.write_text("# Reward model parity\n\n```\n" + "\n".join(self.lines()) + "\n```\n")
        write_json(folder / "reward_model.json", self.to_json())
        return path


def read_groups(path: Path) -> list[tuple[str | list, list[str]]]:
    groups = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, completions = row["prompt"], row["completions"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f'{path} line {n}: expected {{"prompt": ..., "completions": [...]}}'
                            ) from None
        if not completions or not all(isinstance(c, str) for c in completions):
            raise UserError(f"{path} line {n}: completions must be a non-empty list of strings")
        groups.append((prompt, completions))
    if not groups:
        raise UserError(f"{path}: no groups")
    return groups


def _sequences(tokenizer, groups, chat: bool, add_special: bool = False) -> list[list[list[int]]]:
    """Each group's token ids, TRL's way (or with special tokens added, for the template check)."""
    out = []
    for i, (prompt, completions) in enumerate(groups):
        messages = tuple(as_messages(prompt)) if chat or not isinstance(prompt, str) else None
        problem = Problem(i, prompt if isinstance(prompt, str) else "", "", messages=messages)
        texts = reward_texts(tokenizer, problem, completions)
        out.append(encode_texts(tokenizer, texts) if not add_special
                   else [tokenizer(t)["input_ids"] for t in texts])
    return out


def _diff(a: list[float], b: list[float]) -> dict[str, float]:
    d = [abs(x - y) for x, y in zip(a, b)]
    return {"max": max(d), "mean": sum(d) / len(d)}


def _same_order(engine: list[float], reference: list[float], tol: float) -> bool:
    """Every pair the reference tells apart (by more than `tol`) is ordered alike."""
    n = len(reference)
    return all((engine[i] - engine[j]) * (reference[i] - reference[j]) > 0
               for i in range(n) for j in range(i + 1, n)
               if abs(reference[i] - reference[j]) > tol)


def _sigmoid(xs: list[float]) -> list[float]:
    return [1 / (1 + math.exp(-x)) for x in xs]


def _flatten(groups: list[list]) -> list:
    return [x for g in groups for x in g]


async def _engine_scores(folder: Path, dtype: str, activation: bool | None,
                         sequence_sets: list[list[list[int]]]) -> list[list[float]]:
    engine = await PoolingEngine.start(pooling_settings(folder, dtype, ServingEngine()))
    try:
        return [await engine.score(s, activation=activation) for s in sequence_sets]
    finally:
        await engine.close()


def _findings(config: DoctorConfig, served: list[float], raw32: list[float], tol: float,
              template_shift: float | None) -> list[str]:
    """What differs, named where the numbers show it."""
    found = []
    reference = _sigmoid(raw32) if config.reward_activation == "sigmoid" else raw32
    if _diff(served, reference)["max"] > tol:
        if _diff(served, _sigmoid(raw32))["max"] <= tol:
            found.append("activation: the engine applies a sigmoid to the score and the "
                         "reference does not (vLLM's default for a one-label classifier; TRL "
                         "rewards with the raw logit): set rewards.models[].activation and "
                         "pass it to both sides")
        elif _diff(served, raw32)["max"] <= tol:
            found.append("activation: the reference applies a sigmoid and the engine does not")
        elif config.dtype != "float32":
            found.append(f"dtype: the engine runs in {config.dtype}, the reference in float32; "
                         "this much is that dtype's rounding (run in float32 to check the "
                         "set-up itself)")
    if template_shift is not None:
        found.append(f"template: tokenizing the texts with special tokens added (a plain "
                     f"tokenizer call, vLLM's default for a text prompt) changes the ids and "
                     f"moves the score by up to {template_shift:.2e}; both sides must get the "
                     "ids TRL makes (add_special_tokens=False), as parityrl passes them")
    return found


def run_reward_check(config: DoctorConfig, progress) -> RewardCheck:
    folder = resolve_model(config.reward_model, say=progress.say)
    check_reward_model_folder(folder)
    tokenizer = load_tokenizer(folder)
    groups = read_groups(config.reward_texts) if config.reward_texts else DEFAULT_GROUPS
    chat = has_chat_template(tokenizer) if config.chat_template is None else config.chat_template
    ids = _sequences(tokenizer, groups, chat)
    with_special = _sequences(tokenizer, groups, chat, add_special=True)
    changed = _flatten(ids) != _flatten(with_special)
    activation = {"same": config.reward_activation == "sigmoid", "none": False,
                  "sigmoid": True, "vllm-default": None}[config.reward_engine_activation]
    progress.status("scoring on a vLLM pooling engine (starting it)")
    sets = [_flatten(ids)] + ([_flatten(with_special)] if changed else [])
    served, *special = asyncio.run(_engine_scores(folder, config.dtype, activation, sets))
    progress.status("scoring in transformers, float32 and float64")
    raw = {d: ReferenceRewardModel(folder, d).score(_flatten(ids), False)
           for d in ("float32", "float64")}
    wanted = {d: _sigmoid(v) if config.reward_activation == "sigmoid" else v
              for d, v in raw.items()}
    tol = config.tol if config.tol is not None else TOL[config.dtype]
    diffs = {"engine vs transformers float32": _diff(served, wanted["float32"]),
             "engine vs transformers float64": _diff(served, wanted["float64"]),
             "transformers float32 vs float64": _diff(wanted["float32"], wanted["float64"])}
    sizes = [len(c) for _, c in groups]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    agree = [_same_order(served[a:a + n], wanted["float32"][a:a + n], tol)
             for a, n in zip(starts, sizes)]
    shift = _diff(special[0], served)["max"] if special else None
    passed = diffs["engine vs transformers float32"]["max"] <= tol and all(agree)
    header = {"reward_model": config.reward_model, "dtype": config.dtype,
              "texts": len(served), "chat_template": chat, "tol": tol,
              "activation": config.reward_activation,
              "engine_activation": {True: "sigmoid", False: "none", None: "vLLM's default"}[
                  activation]}
    return RewardCheck(header, diffs, agree, passed,
                       _findings(config, served, raw["float32"], tol, shift))
