"""A task over a local Hugging Face dataset with TRL-style reward functions, used unchanged.

    task:
      type: hf_dataset
      path: data/train.parquet          # parquet / json / jsonl / csv / arrow file, a folder of
                                        # them, or a folder written by Dataset.save_to_disk
      reward_funcs: ["my_rewards:accuracy", "my_rewards:format"]
      reward_weights: [1.0, 0.2]        # default: 1 each

The rows are what TRL's `GRPOTrainer` takes: `prompt` is a string (sampled as plain text) or a
conversation (a list of {"role", "content"} messages, rendered with the tokenizer's chat
template). Each reward function is called as TRL calls it:

    fn(prompts=[...], completions=[...], completion_ids=[[...]], <every other column>=[...],
       trainer_state=None, log_extra=..., log_metric=...) -> list[float | None]

with one entry per completion of a group (a conversation's completion is
[{"role": "assistant", "content": text}]). The reward is the weighted sum of the functions, a
None or NaN value left out (TRL's nansum). Every function's signature is
checked against the columns when the task is built, so a wrong signature or a missing column
is a one-line error before any engine starts. Held-out accuracy counts a completion correct
when its reward is at least 1.

No hub access at run time: the files are read with datasets' packaged builders, offline.
"""

from __future__ import annotations

import inspect
import math
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from parityrl.core.errors import UserError
from parityrl.tasks.base import Problem
from parityrl.tasks.jsonl import load_callable

# datasets' packaged builder for each data-file suffix.
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv",
            ".arrow": "arrow"}
# What TRL passes every reward function besides the dataset's columns.
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra",
                 "log_metric")


class HFDatasetConfig(BaseModel):
    """Rows of a local Hugging Face dataset, scored by TRL-signature reward functions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["hf_dataset"] = Field("hf_dataset", description="Rows of a local Hugging "
                                        "Face dataset, scored by TRL-signature reward functions.")
    path: str = Field(description="A data file (parquet, json, jsonl, csv, arrow), a folder of "
                                  "them, or a folder saved by datasets' save_to_disk.")
    split: str = Field("train", description="The split to train on when the path holds several.")
    eval_path: str | None = Field(None, description="Held-out rows (same forms as path); unset: "
                                                    "the last rows of `path`.")
    eval_split: str | None = Field(None, description="Held-out split of `path` (e.g. test), "
                                                     "instead of eval_path or eval_fraction.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Without eval_path or "
                                 "eval_split: share of rows held out from the end.")
    prompt_field: str = Field("prompt", description="Column holding the prompt (text or "
                                                    "conversation).")
    answer_field: str | None = Field(None, description="Column shown as the reference answer in "
                                                       "samples.jsonl (optional).")
    reward_funcs: list[str] = Field(description='"package.module:function" of each '
                                    "TRL-signature reward function; a model folder among them "
                                    "is a reward model (run config: rewards.models).")
    reward_weights: list[float] | None = Field(None, description="One weight per function; "
                                                                 "default 1 each.")
    seed: int = Field(0, description="Seeds the per-epoch shuffle.")
    shuffle: bool = Field(True, description="Shuffle training rows each epoch (else in order).")
    reward_timeout_s: float | None = Field(60.0, gt=0, description="Seconds the rewards may take "
                                           "for one group; longer is a rejection.")

    @model_validator(mode="after")
    def _weights_match(self) -> "HFDatasetConfig":
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for "
                             f"{len(self.reward_funcs)} reward_funcs")
        return self


def load_rows(path: str, split: str) -> list[dict]:
    """The rows of a local dataset as dicts (`split` where it holds several)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, never the hub
    from datasets import DatasetDict, load_dataset, load_from_disk

    where = Path(path)
    if not where.exists():
        raise UserError(f"{path}: no such file or folder")
    try:
        if where.is_dir() and ((where / "dataset_info.json").exists()
                               or (where / "dataset_dict.json").exists()):
            data = load_from_disk(str(where))
        elif where.is_dir():
            data = load_dataset(str(where))
        else:
            builder = BUILDERS.get(where.suffix.lower())
            if builder is None:
                raise UserError(f"{path}: not a data file datasets reads here (one of "
                                f"{', '.join(BUILDERS)})")
            data = load_dataset(builder, data_files=str(where), split="train")
    except UserError:
        raise
    except Exception as e:  # datasets' own errors: a bad file, a schema it cannot read
        raise UserError(f"{path}: datasets cannot read it ({type(e).__name__}: {e})") from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise UserError(f"{path}: no split {split!r} (it has {', '.join(data)})")
        data = data[split]
    rows = data.to_list()
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _is_conversation(value) -> bool:
    return (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in value))


def _problem(where: str, row: dict, config: HFDatasetConfig, index: int) -> Problem:
    if config.prompt_field not in row:
        raise UserError(f"{where}: no {config.prompt_field!r} column (columns: "
                        f"{', '.join(row)})")
    prompt = row[config.prompt_field]
    columns = {k: v for k, v in row.items() if k != config.prompt_field}
    answer = "" if config.answer_field is None else str(row.get(config.answer_field, ""))
    meta = {"row": index, "columns": columns, "trl_prompt": prompt}
    if isinstance(prompt, str):
        return Problem(index, prompt, answer, meta=meta)
    if _is_conversation(prompt):
        user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
        return Problem(index, user, answer, meta=meta,
                       messages=tuple(dict(m) for m in prompt))
    raise UserError(f"{where}: {config.prompt_field!r} must be a string or a conversation (a list "
                    f"of role/content messages), got {type(prompt).__name__}")


def check_reward_signature(fn, name: str, columns: list[str]) -> None:
    """Refuse, in one line, a function TRL's call would not fit: a parameter it never gets (a
    missing column), or no room for the arguments it does get."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check
    params = signature.parameters.values()
    given = set(TRL_ARGUMENTS) | set(columns)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        unplaced = [a for a in ("prompts", "completions") if a not in signature.parameters]
        unplaced += sorted(given - set(signature.parameters) - set(unplaced))
        if unplaced:
            raise UserError(f"reward function {name} does not take TRL's arguments: it has no "
                            f"parameter for {', '.join(unplaced[:3])} (TRL's signature: "
                            "fn(prompts, completions, **kwargs))")
    for p in params:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise UserError(f"reward function {name}: parameter {p.name!r} is positional-only; "
                            "TRL passes every argument by name")
        if p.name not in given and p.default is inspect.Parameter.empty:
            raise UserError(f"reward function {name} needs column {p.name!r}, which the dataset "
                            f"does not have (columns: {', '.join(columns) or 'none'})")


class HFDatasetTask:
    name = "hf_dataset"

    def __init__(self, config: HFDatasetConfig):
        self.config = config
        rows = load_rows(config.path, config.split)
        problems = [_problem(f"{config.path} row {i}", row, config, i)
                    for i, row in enumerate(rows)]
        if config.eval_path is not None or config.eval_split is not None:
            source = config.eval_path or config.path
            held = load_rows(source, config.eval_split or config.split)
            self.train = problems
            self.eval = [_problem(f"{source} row {i}", row, config, i)
                         for i, row in enumerate(held)]
        else:
            n_eval = 0
            if len(problems) >= 2 and config.eval_fraction > 0:
                n_eval = min(len(problems) - 1, max(1, int(len(problems) * config.eval_fraction)))
            self.train = problems[: len(problems) - n_eval]
            self.eval = [replace(p, index=i) for i, p in enumerate(problems[len(problems) - n_eval:])]
        columns = list(problems[0].meta["columns"])
        self.reward_funcs = []
        for path in config.reward_funcs:
            fn = load_callable(path, what="reward function")
            check_reward_signature(fn, path, columns)
            self.reward_funcs.append((path, fn))
        self.weights = config.reward_weights or [1.0] * len(self.reward_funcs)
        self._perm: tuple[int, list[int]] = (-1, [])

    def train_problem(self, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"train index must be >= 0, got {index}")
        epoch, pos = divmod(index, len(self.train))
        if self.config.shuffle:
            cached, order = self._perm
            if cached != epoch:
                order = list(range(len(self.train)))
                random.Random(f"hf_dataset:{self.config.seed}:{epoch}").shuffle(order)
                self._perm = (epoch, order)
            pos = order[pos]
        row = self.train[pos]
        return replace(row, index=index, meta={**row.meta, "epoch": epoch})

    def eval_problems(self) -> list[Problem]:
        return list(self.eval)

    def reward(self, problem: Problem, completion: str) -> float:
        return self.rewards(problem, [completion])[0]

    def rewards(self, problem: Problem, completions: list[str],
                completion_ids: list[list[int]] | None = None) -> list[float]:
        """The weighted rewards of a group's completions of `problem`, one TRL call a function."""
        n = len(completions)
        conversational = problem.messages is not None
        texts = ([[{"role": "assistant", "content": c}] for c in completions] if conversational
                 else list(completions))
        kwargs = {k: [v] * n for k, v in problem.meta["columns"].items()}
        kwargs |= dict(prompts=[problem.meta["trl_prompt"]] * n, completions=texts,
                       completion_ids=completion_ids if completion_ids is not None else [[]] * n,
                       trainer_state=None, log_extra=lambda *a, **k: None,
                       log_metric=lambda *a, **k: None)
        total = [0.0] * n  # TRL's nansum: a completion every function skipped scores 0
        for (name, fn), weight in zip(self.reward_funcs, self.weights):
            values = list(fn(**kwargs))
            if len(values) != n:
                raise ValueError(f"reward function {name} returned {len(values)} rewards for {n} "
                                 "completions")
            for i, value in enumerate(values):
                if value is not None and not math.isnan(float(value)):
                    total[i] += weight * float(value)
        return total
