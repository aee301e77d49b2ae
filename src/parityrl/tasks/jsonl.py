"""A task read from a JSONL file of {"prompt": ..., "answer": ...} rows.

Scored by math-verify (symbolic comparison of the final answer) or by a user function named by an
import path, "package.module:function", called as fn(prompt, completion, answer) -> float.
"""

from __future__ import annotations

import importlib
import json
import random
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from pydantic import BaseModel, ConfigDict, Field

from parityrl.errors import UserError
from parityrl.tasks.base import Problem

RewardFn = Callable[[str, str, str], float]

# Seconds math-verify may spend parsing or comparing one expression (main thread only, see below).
MATH_VERIFY_TIMEOUT_S = 5


class JsonlConfig(BaseModel):
    """Problems from a JSONL file; each row needs a "prompt" and an "answer"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["jsonl"] = "jsonl"
    path: str = Field(description="JSONL file of training rows.")
    eval_path: str | None = Field(
        None, description="JSONL file of held-out rows; if unset, the last rows of `path` are."
    )
    eval_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Without eval_path: fraction of rows held out from the end (>= 1 row if > 0).",
    )
    prompt_template: str = Field(
        "{prompt}", description="str.format template over the row's fields."
    )
    reward: str = Field(
        "math_verify",
        description='"math_verify", or "package.module:function": fn(prompt, completion, answer).',
    )
    seed: int = Field(0, description="Seeds the per-epoch shuffle.")
    shuffle: bool = Field(True, description="Shuffle training rows each epoch (else file order).")


def load_reward_fn(path: str) -> RewardFn:
    """Import a user reward function from "package.module:function"."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f'reward {path!r}: expected "math_verify" or "package.module:function"')
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the user's module raises while importing
        why = f"{type(e).__name__}: {e}"
        raise UserError(f"reward {path!r}: cannot import {module_name!r}: {why}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise UserError(f"reward {path!r}: {attr!r} is not callable")
    return fn


def read_rows(path: str, template: str) -> list[Problem]:
    """Rows of a JSONL file as problems (index = row number among non-blank lines)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such file")
    problems: list[Problem] = []
    with file.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f'{where}: expected a JSON object with "prompt" and "answer"')
            for key in ("prompt", "answer"):
                if key not in row:
                    raise UserError(f'{where}: row has no "{key}" key')
            try:
                prompt = template.format(**row)
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"{where}: prompt_template {template!r} fails: {e!r}") from None
            answer = str(row["answer"])  # numbers in JSON are fine
            problems.append(Problem(len(problems), prompt, answer, meta={"line": line_no}))
    if not problems:
        raise UserError(f"{path}: no rows")
    return problems


class JsonlTask:
    name = "jsonl"

    def __init__(self, config: JsonlConfig):
        self.config = config
        rows = read_rows(config.path, config.prompt_template)
        if config.eval_path is not None:
            self.train, self.eval = rows, read_rows(config.eval_path, config.prompt_template)
        else:
            n_eval = 0
            if len(rows) >= 2 and config.eval_fraction > 0:
                n_eval = min(len(rows) - 1, max(1, int(len(rows) * config.eval_fraction)))
            self.train, self.eval = rows[: len(rows) - n_eval], rows[len(rows) - n_eval :]
        # An eval problem's index is its position in the eval list, like any split's stream.
        self.eval = [replace(p, index=i) for i, p in enumerate(self.eval)]
        self.reward_fn: RewardFn | None = None
        if config.reward != "math_verify":
            self.reward_fn = load_reward_fn(config.reward)
        self._perm: tuple[int, list[int]] = (-1, [])  # (epoch, order): the last epoch's shuffle
        self._gold: dict[str, list] = {}  # answer -> parsed answer; parsing is the slow part

    def train_problem(self, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"train index must be >= 0, got {index}")
        epoch, pos = divmod(index, len(self.train))
        row = self.train[self._order(epoch)[pos]] if self.config.shuffle else self.train[pos]
        return replace(row, index=index, meta={**row.meta, "epoch": epoch})

    def _order(self, epoch: int) -> list[int]:
        # Cached: rebuilding an O(n) permutation per problem is slow, and it depends only on epoch.
        cached_epoch, order = self._perm
        if cached_epoch != epoch:
            order = list(range(len(self.train)))
            random.Random(f"jsonl:{self.config.seed}:{epoch}").shuffle(order)
            self._perm = (epoch, order)  # one assignment: other threads never see a half update
        return order

    def eval_problems(self) -> list[Problem]:
        return list(self.eval)

    def reward(self, problem: Problem, completion: str) -> float:
        if self.reward_fn is not None:
            return float(self.reward_fn(problem.prompt, completion, problem.answer))
        return self._math_verify(problem.answer, completion)

    def _math_verify(self, answer: str, completion: str) -> float:
        if completion.strip() == answer.strip():
            return 1.0  # also covers answers math-verify cannot parse (e.g. "yes")
        # math-verify's timeouts use SIGALRM, which raises outside the main thread; there we run
        # without one (rewards may be computed in a worker thread).
        in_main = threading.current_thread() is threading.main_thread()
        timeout = MATH_VERIFY_TIMEOUT_S if in_main else None
        try:
            gold = self._gold.get(answer)
            if gold is None:
                gold = self._gold[answer] = parse_gold(answer, timeout)
            pred = parse(completion, parsing_timeout=timeout)
            return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0
        except (Exception, TimeoutException):  # TimeoutException is a BaseException
            return 0.0


def parse_gold(answer: str, timeout: int | None) -> list:
    """Parse a reference answer; bare LaTeX like "\\sqrt{2}" only parses inside $...$."""
    gold = parse(answer, parsing_timeout=timeout)
    if "$" not in answer and all(isinstance(g, str) for g in gold):
        gold = parse(f"${answer}$", parsing_timeout=timeout) or gold
    return gold
