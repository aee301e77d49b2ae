"""Task configs by `type`, and the one place that turns a config into a task."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from parityrl.errors import UserError
from parityrl.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from parityrl.tasks.base import Task
from parityrl.tasks.hf_dataset import HFDatasetConfig, HFDatasetTask
from parityrl.tasks.jsonl import JsonlConfig, JsonlTask, load_reward_fn

__all__ = ["TaskConfig", "build_task", "load_reward_fn"]

# A run config's `task:` section; pydantic picks the model from its "type" field.
TaskConfig = Annotated[ArithmeticConfig | JsonlConfig | HFDatasetConfig,
                      Field(discriminator="type")]

# Built-ins are named explicitly: no import strings, so a typo fails at import time, not mid-run.
_TASKS: dict[type, type] = {
    ArithmeticConfig: ArithmeticTask,
    JsonlConfig: JsonlTask,
    HFDatasetConfig: HFDatasetTask,
}


def build_task(config: ArithmeticConfig | JsonlConfig | HFDatasetConfig) -> Task:
    task_cls = _TASKS.get(type(config))
    if task_cls is None:
        raise UserError(f"unknown task config {type(config).__name__}")
    return task_cls(config)
