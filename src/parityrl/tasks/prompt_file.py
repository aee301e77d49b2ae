"""Prompts from a file (`parityrl doctor --prompts`): a text file, one prompt a line, or JSONL
rows with "messages" (an OpenAI-style list of {"role", "content"}) or "prompt" (a string, with an
optional "system" message). Only the prompts: a task's rows with answers are jsonl.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

from parityrl.core.errors import UserError
from parityrl.tasks.prompts import Messages, as_messages


def is_messages(value) -> bool:
    """A non-empty list of {"role": str, "content": str} objects."""
    return (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value))


def read_prompts(path: Path) -> list[str | Messages]:
    """The prompts of a .jsonl file's rows, or of a text file's non-blank lines."""
    if not path.exists():
        raise UserError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix != ".jsonl":
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = [_row_prompt(path, lineno, line)
                   for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not prompts:
        raise UserError(f"prompts file is empty: {path}")
    return prompts


def _row_prompt(path: Path, lineno: int, line: str) -> str | Messages:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if isinstance(row, dict) and is_messages(row.get("messages")):
        return row["messages"]
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        system = row.get("system")
        return as_messages(row["prompt"], system) if system else row["prompt"]
    raise UserError(f'{path}:{lineno}: expected an object with "messages" (a list of '
                    f'{{"role", "content"}}) or "prompt" (a string)')
