"""The supervised warm start: a fixed number of steps, or on until a check says the model is ready
(parityrl/trainer/sft.py; the demo's warm start stops at a held-out accuracy)."""

from __future__ import annotations

import pytest

from parityrl.models.load import load_policy
from parityrl.models.tokenizer import load_tokenizer
from parityrl.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from parityrl.trainer.sft import supervised_warmup


@pytest.mark.parametrize("ready_at, expected_steps, expected_checks", [
    (None, 3, []),            # no check: exactly `steps`
    (7, 7, [3, 5, 7]),        # checked after 3 steps, then every 2: stops when the check says so
    (99, 8, [3, 5, 7]),       # never ready: stops at max_steps
])
def test_the_warm_start_runs_its_steps_then_until_ready_or_max_steps(
        tiny_model, ready_at, expected_steps, expected_checks):
    checks: list[int] = []

    def done(step: int) -> bool:
        checks.append(step)
        return step >= ready_at

    losses = supervised_warmup(load_policy(tiny_model), load_tokenizer(tiny_model),
                               ArithmeticTask(ArithmeticConfig()), steps=3, batch_size=2,
                               lr=1e-3, check_every=2, max_steps=8,
                               done=None if ready_at is None else done)
    assert len(losses) == expected_steps
    assert checks == expected_checks
