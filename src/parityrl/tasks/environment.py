"""Environments: multi-turn episodes on top of a task's problems.

An episode starts from a problem's messages (`start`). After each assistant turn the environment
`respond`s with an observation to show the model (a tool result, a user message) or ends the
episode with a reward. Environments work on chat messages; the episode runner
(rollouts/episode.py) turns them into tokens without ever re-tokenizing what the engine sampled.

Built in: `calculator` (tasks/calculator.py). Users plug their own by import path:
`env: {type: python, factory: "my_pkg.envs:make_env"}`, a callable taking the task and returning
an object with the two methods below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from parityrl.tasks.base import Problem

Message = dict[str, str]


@dataclass(frozen=True)
class EnvReply:
    message: Message | None = None  # shown to the model before its next turn; None = episode over
    reward: float | None = None  # the episode's reward; required when it is over


class Environment(Protocol):
    def start(self, problem: Problem) -> list[Message]:
        """The episode's first messages (rendered with the chat template for the first turn)."""

    def respond(self, problem: Problem, messages: list[Message], last_turn: bool) -> EnvReply:
        """React to the conversation so far (its last message is the assistant's turn). With
        `last_turn` no observation can be shown any more: the reply must end the episode."""


class EnvConfig(BaseModel):
    """The run's `env:` section; absent = single-turn (the task's prompt, one completion)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["calculator", "python"] = Field(
        "calculator", description="calculator: the built-in tool environment (tasks/calculator.py: "
                                  "CALC(expression) calls answered between turns); python: the "
                                  "environment env.factory returns.")
    factory: str | None = Field(None, description='python: "package.module:function" called '
                                                  "with the task, returning an environment.")
    max_turns: int = Field(3, ge=1, description="Assistant turns per episode at most.")
    max_episode_tokens: int | None = Field(
        None, ge=1, description="Tokens after the first prompt (assistant + observation) per "
                                "episode at most; None = up to engine.max_model_len.")
    timeout_s: float | None = Field(60.0, gt=0, description="Seconds one environment reply may "
                                                           "take; longer rejects the group.")
    on_template_mismatch: Literal["warn", "refuse"] = Field(
        "warn", description="When the chat template renders the finished conversation to other "
                            "token ids than the engine saw (it rewrites history, or text does not "
                            "re-tokenize to the sampled ids): warn (rollouts/template_mismatch) "
                            "or stop the run. The trainer always trains on what the engine saw.")
    observation_role: str = Field("user", description="calculator: the role of its tool "
                                                      "results (some templates have no 'tool').")

    @model_validator(mode="after")
    def _factory_for_python(self) -> "EnvConfig":
        if self.type == "python" and not self.factory:
            raise ValueError('env.type=python needs env.factory="package.module:function"')
        return self
