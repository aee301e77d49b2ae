"""`parityrl demo`, shortened: the warm start, the pipeline run and summary.json, which must say
what the run's own metrics say."""

from __future__ import annotations

import json

import pytest

from parityrl.runlog import read_metrics

pytestmark = pytest.mark.slow


def test_demo_summary_agrees_with_the_run_it_summarises(tmp_path, capsys):
    from parityrl.demo import run_demo

    out = tmp_path / "demo"
    messages: list[str] = []
    # A warm start long enough for some reward, sync mode for a parity probe at every step: the
    # figures the summary draws from differ from step to step. The evaluation also samples 4
    # completions per problem for pass@k (eval_pass_k).
    summary = run_demo(out, console_print=messages.append, warmup={"steps": 300, "target_accuracy": None}, mode="sync",
                       max_steps=3, eval_size=24, eval_pass_k=[1, 2, 4],
                       **{"actor.prompts_per_step": 4, "actor.group_size": 4})
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = read_metrics(out / "rl" / "metrics.jsonl")
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 3]
    for row in (r for r in rows if "eval/accuracy" in r):
        passes = [row[f"eval/pass@{k}"] for k in (1, 2, 4)]
        assert all(0.0 <= p <= 1.0 for p in passes) and passes == sorted(passes), row
        assert row["eval/mean@4"] == pytest.approx(passes[0])  # pass@1 = c/n, averaged
    # The progress line of the last evaluating step shows pass@k, in order of k.
    last = [r for r in rows if "eval/accuracy" in r][-1]
    line = next(x for x in capsys.readouterr().out.splitlines() if "RL step 3/3 [" in x)
    assert line.endswith("".join(f"  pass@{k} {last[f'eval/pass@{k}']:.3f}" for k in (1, 2, 4)))
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
