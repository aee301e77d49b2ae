"""The DAPO-family knobs in one short pipeline run (docs/recipes.md); their arithmetic is checked
by hand in test_objectives.py and test_trainer.py."""

from __future__ import annotations

import json

import pytest
import yaml

from parityrl.config import build_config
from parityrl.models.builtin import resolve_model
from parityrl.models.warm_start import DEMO_TASK
from parityrl.runlog import read_metrics


def warm_model_run(mode: str, max_steps: int, max_draws: float, **sections):
    """A short run of the warm-started demo model at T = 1 in groups of two, dynamic sampling on
    (most of its groups are all wrong)."""
    return build_config({
        "name": f"dapo-{mode}", "seed": 0, "max_steps": max_steps, "mode": mode,
        "model": str(resolve_model("builtin:arithmetic-warm")),
        "sampling": {"temperature": 1.0, "max_tokens": 6}, "task": DEMO_TASK,
        "actor": {"group_size": 2, "prompts_per_step": 8,
                  "dynamic_sampling": {"enabled": True, "max_draws": max_draws}},
        "engine": {"max_model_len": 64, "kv_cache_gib": 0.1},
        "tensorboard": False, "samples_every": 0, **sections})


@pytest.mark.slow
def test_an_async_run_with_dynamic_sampling_trains_only_on_groups_with_signal(tmp_path):
    """The warm-started demo model (40 % right greedy, far less at temperature 1) in pipeline
    mode, groups of two: most groups are all wrong (without dynamic sampling 88 % of these
    rollouts had advantage 0). With dynamic sampling every trained group has signal, the dropped
    ones are counted and in problems.jsonl as no_signal, each problem once, and the checkpoint's
    data position counts them as done (a resume does not draw them again). Overlong shaping and
    Dr. GRPO's aggregation are on in the same run."""
    from parityrl.pipeline import run_training

    cfg = warm_model_run("async", max_steps=2, max_draws=4.0, **{
        "trainer": {"loss": {"aggregation": "seq-mean-token-sum", "clip_high": 0.28},
                    "overlong": {"mode": "shape", "window": 2}},
        "checkpoint": {"every": 2}})
    run_dir = tmp_path / "run"
    run_training(cfg, run_dir, on_message=lambda m: None)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 0]
    assert len(rows) == 2
    for r in rows:
        assert r["rl/zero_advantage_frac"] == 0.0  # no group without signal reached the trainer
        assert r["rl/generation_overdraw"] == pytest.approx(
            r["rl/groups_dropped_no_signal"] / (r["rl/samples"] / 2))
        assert 0.0 <= r["rl/truncated_frac"] <= 1.0 and r["rl/overlong_penalty_mean"] <= 0.0
    assert sum(r["rl/groups_dropped_no_signal"] for r in rows) > 0
    problems = read_metrics(run_dir / "problems.jsonl")
    no_signal = [i for r in problems for i in r["no_signal"]]
    done = [i for r in problems for kind in ("trained", "rejected", "dropped", "no_signal")
            for i in r[kind]]
    assert no_signal and len(done) == len(set(done))
    state = json.loads((run_dir / "checkpoints" / "step-000002" / "state.json").read_text())
    saved_done = set(state["extra"]["done_above"])
    assert all(i < state["data_position"] or i in saved_done for i in done)
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["trainer"]["loss"]["aggregation_length"] == 6  # resolved: max_tokens


@pytest.mark.slow
def test_a_sync_run_with_dynamic_sampling_stops_drawing_at_its_cap(tmp_path):
    """Sync mode, max_draws 1.5: a step of 8 groups draws at most 12 problems, and with most
    groups all wrong it trains on the fewer groups with signal it found (train_fewer)."""
    from parityrl.pipeline import run_training

    cfg = warm_model_run("sync", max_steps=1, max_draws=1.5)
    run_training(cfg, tmp_path / "run", on_message=lambda m: None)
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    trained = row["rl/samples"] / 2
    assert row["rl/zero_advantage_frac"] == 0.0 and 1 <= trained < 8
    assert trained + row["rl/groups_dropped_no_signal"] <= 12
    (problems,) = read_metrics(tmp_path / "run" / "problems.jsonl")
    assert len(problems["trained"]) + len(problems["no_signal"]) <= 12
