"""A task read from a JSONL file: one problem a row.

Each row gives the request in one of three ways and the reference answer in one field:

    {"prompt": "What is 2+3?", "answer": "5"}                         plain text (or chat with
    {"prompt": "...", "system": "You are ...", "answer": "5"}          chat_template: true)
    {"messages": [{"role": "user", "content": "..."}], "answer": "5"}  chat messages
    {"question": "...", "answer": "... #### 72"}                       GSM8K, with the mapping
        prompt_field: question, answer_regex: "####\\s*(.+)$"

`prompt_template` (str.format over every field of the row) builds the prompt from any fields.
Scored by math-verify (symbolic comparison of the final answer) or by a user function named by an
import path, "package.module:function", called as fn(prompt, completion, answer) -> float.
"""

from __future__ import annotations

import importlib
import json
import logging
import random
import re
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from parityrl.core.errors import UserError
from parityrl.tasks.base import Problem
from parityrl.tasks.prompt_file import is_messages

RewardFn = Callable[[str, str, str], float]

# Seconds math-verify may spend parsing or comparing one expression (main thread only, see below).
MATH_VERIFY_TIMEOUT_S = 5
# Off the main thread math-verify runs without its own timeout and warns about it on every call;
# the actor bounds every reward with task.reward_timeout_s instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)


class JsonlConfig(BaseModel):
    """Problems from a JSONL file (see the module docstring for the row formats)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["jsonl"] = Field("jsonl", description="Problems read from a JSONL file, "
                                                       "scored by `reward`.")
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
    prompt_field: str = Field("prompt", description="Row field holding the request text.")
    answer_field: str = Field("answer", description="Row field holding the reference answer.")
    answer_regex: str | None = Field(
        None, description='Take the answer from this regex\'s first group, e.g. "####\\s*(.+)$" '
                          "for GSM8K; unset = the whole field.")
    prompt_template: str | None = Field(
        None, description="str.format template over the row's fields; unset = the prompt_field.")
    chat_template: bool = Field(
        False, description="Render requests with the tokenizer's chat template (rows with "
                           "`messages` need it).")
    system: str | None = Field(None, description="System message for every row (chat only).")
    reward: str = Field(
        "math_verify",
        description='"math_verify", or "package.module:function": fn(prompt, completion, answer).',
    )
    seed: int = Field(0, description="Seeds the per-epoch shuffle.")
    reward_timeout_s: float | None = Field(
        60.0, gt=0, description="Seconds the reward may take for one group; longer is a "
                                "rejection (the run goes on). None = no limit.")
    shuffle: bool = Field(True, description="Shuffle training rows each epoch (else file order).")

    @field_validator("answer_regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"answer_regex {v!r} is not a regular expression ({e})") from None
        return v


def load_reward_fn(path: str) -> RewardFn:
    """Import a user reward function from "package.module:function"."""
    if ":" not in path:
        raise UserError(f'reward {path!r}: expected "math_verify" or "package.module:function"')
    return load_callable(path, what="reward")


def load_callable(path: str, what: str):
    """Import a user callable from "package.module:function" (`what` names it in errors)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f'{what} {path!r}: expected "package.module:function"')
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the user's module raises while importing
        why = f"{type(e).__name__}: {e}"
        raise UserError(f"{what} {path!r}: cannot import {module_name!r}: {why}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise UserError(f"{what} {path!r}: {attr!r} is not callable")
    return fn


def _lines(path: str):
    """(line number, text) of the file's non-blank lines; BOM, CRLF and bad bytes handled."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such file")
    with file.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if line.strip():
                yield line_no, line


def read_rows(path: str, config: JsonlConfig) -> list[Problem]:
    """Rows of a JSONL file as problems (index = row number among non-blank lines)."""
    problems: list[Problem] = []
    for line_no, line in _lines(path):
        problems.append(_problem(f"{path}:{line_no}", line, config, len(problems), line_no))
    if not problems:
        raise UserError(f"{path}: no rows")
    return problems


def _problem(where: str, line: str, config: JsonlConfig, index: int, line_no: int) -> Problem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    answer = _answer(where, row, config)
    messages = row.get("messages")
    if messages is not None:
        if not is_messages(messages):
            raise UserError(f'{where}: "messages" must be a list of {{"role", "content"}} objects')
        if not config.chat_template:
            raise UserError(f'{where}: a row with "messages" needs task.chat_template: true')
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        chat = [dict(m) for m in messages]
    else:
        prompt = _prompt(where, row, config)
        chat = None
        if config.chat_template:
            chat = [{"role": "user", "content": prompt}]
            system = row.get("system", config.system)
            if system is not None:
                if not isinstance(system, str):
                    raise UserError(f'{where}: "system" must be a string')
                chat.insert(0, {"role": "system", "content": system})
    if chat is not None and config.system is not None and chat[0]["role"] != "system":
        chat.insert(0, {"role": "system", "content": config.system})
    return Problem(index, prompt, answer, meta={"line": line_no},
                   messages=None if chat is None else tuple(chat))


def _prompt(where: str, row: dict, config: JsonlConfig) -> str:
    if config.prompt_template is not None:
        try:
            return config.prompt_template.format(**row)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise UserError(f"{where}: prompt_template {config.prompt_template!r} fails: {e!r}") from None
    if config.prompt_field not in row:
        raise UserError(f'{where}: row has no "{config.prompt_field}" key (or "messages")')
    value = row[config.prompt_field]
    if not isinstance(value, str):
        raise UserError(f'{where}: "{config.prompt_field}" must be a string, got '
                        f"{type(value).__name__}")
    return value


def _answer(where: str, row: dict, config: JsonlConfig) -> str:
    if config.answer_field not in row:
        raise UserError(f'{where}: row has no "{config.answer_field}" key')
    value = row[config.answer_field]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise UserError(f'{where}: "{config.answer_field}" must be a string or a number, got '
                        f"{type(value).__name__}")
    answer = str(value)  # numbers in JSON are fine
    if config.answer_regex is not None:
        match = re.search(config.answer_regex, answer, flags=re.MULTILINE)
        if match is None or not match.groups():
            raise UserError(f"{where}: answer_regex {config.answer_regex!r} finds no answer "
                            f"(first group) in {answer[-60:]!r}")
        answer = match.group(1).strip()
    return answer


class JsonlTask:
    name = "jsonl"

    def __init__(self, config: JsonlConfig):
        self.config = config
        rows = read_rows(config.path, config)
        if config.eval_path is not None:
            self.train, self.eval = rows, read_rows(config.eval_path, config)
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
