"""`parityrl demo`, shortened: the warm start, the pipeline run and summary.json, which must say
what the run's own metrics say."""

from __future__ import annotations

import json

import pytest

from parityrl.runlog import read_metrics

pytestmark = pytest.mark.slow


def test_demo_summary_agrees_with_the_run_it_summarises(tmp_path):
    from parityrl.demo import run_demo

    out = tmp_path / "demo"
    messages: list[str] = []
    # A warm start long enough for some reward, sync mode for a parity probe at every step: the
    # figures the summary draws from differ from step to step.
    summary = run_demo(out, console_print=messages.append, warmup={"steps": 300, "target_accuracy": None}, mode="sync",
                       max_steps=3, eval_size=24, **{"actor.prompts_per_step": 4,
                                                     "actor.group_size": 4})
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = read_metrics(out / "rl" / "metrics.jsonl")
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 3]
    assert (summary["accuracy_before_rl"], summary["accuracy_after_rl"]) == (evals[0], evals[-1])
    assert summary["improvement_points"] == pytest.approx(100 * (evals[-1] - evals[0]))
    trained = [r for r in rows if "rl/reward_mean" in r]
    assert summary["rl_steps"] == len(trained) == 3
    assert summary["eval_problems"] == 24
    assert summary["reward_first_10_steps"] == pytest.approx(
        sum(r["rl/reward_mean"] for r in trained) / 3)
    assert summary["mismatch_max_abs_diff_worst_step"] == max(
        r["mismatch/max_abs_diff"] for r in trained if r.get("mismatch/max_abs_diff") is not None)
    assert summary["mismatch_max_abs_diff_worst_step"] <= 1e-5
    warm = summary["warmup"]
    assert warm["steps"] == 300 and warm["loss_last"] < warm["loss_first"]
    assert (out / "model-sft" / "model.safetensors").exists()
    assert (out / "rl" / "plots" / "training.png").stat().st_size > 10_000
    assert any("built a tiny qwen2 model" in m for m in messages)
