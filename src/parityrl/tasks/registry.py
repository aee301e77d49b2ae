"""Task configs by `type`, and the one place that turns a config into a task (and an `env:` section
into an environment)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from parityrl.core.errors import UserError
from parityrl.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from parityrl.tasks.base import Task
from parityrl.tasks.calculator import CalculatorEnv
from parityrl.tasks.environment import EnvConfig, Environment
from parityrl.tasks.hf_dataset import HFDatasetConfig, HFDatasetTask
from parityrl.tasks.jsonl import JsonlConfig, JsonlTask, load_callable, load_reward_fn

__all__ = ["TaskConfig", "build_environment", "build_task", "load_reward_fn"]

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


def build_environment(config: EnvConfig, task: Task) -> Environment:
    if config.type == "calculator":
        return CalculatorEnv(task, observation_role=config.observation_role)
    if not config.factory:
        raise UserError('env.type=python needs env.factory="package.module:function"')
    env = load_callable(config.factory, what="env.factory")(task)
    for method in ("start", "respond"):
        if not callable(getattr(env, method, None)):
            raise UserError(f"env.factory {config.factory!r} returned {type(env).__name__}, "
                            f"which has no {method}() method")
    return env
