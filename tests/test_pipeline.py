"""Pipeline RL end to end on the real vLLM CPU engine and a tiny local model.

The untrained tiny model never solves arithmetic, so these runs use a JSONL task with a dense test
reward (share of digits in the completion): advantages are non-zero and the losses do real work.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import (digit_share_config, kill_group, metric_rows, shm_of, start_train,
                     train_cmd, wait_gone, wait_while_running, write_addition_rows)
from parityrl.config import build_config
from parityrl.pipeline import ParityAlarm, run_training
from parityrl.runlog import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("plugins_importable")]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_addition_rows(tmp_path_factory.mktemp("task") / "prompts.jsonl")


def make_config(model: str, prompts: Path, **overrides) -> dict:
    # Long completions and two batches in flight: some groups are still generating when the
    # weights are pushed (in-flight updates), while the parity probe waits for a finished one.
    return digit_share_config(model, prompts, **{
        "sampling.max_tokens": 96, "actor.max_lag": 1, "actor.max_groups_in_flight": 8,
        "parity.probe_wait_s": 5.0, "checkpoint.every": 3, "engine.max_model_len": 160,
        "engine.kv_cache_gib": 0.25, "tensorboard": True, **overrides})


def measured(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


@pytest.fixture(scope="module")
def async_run(tiny_model, prompts_file, tmp_path_factory, plugins_importable):
    run_dir = tmp_path_factory.mktemp("async-run")
    cfg = build_config(make_config(tiny_model, prompts_file))
    messages: list[str] = []
    result = run_training(cfg, run_dir, on_message=messages.append)
    return run_dir, result, read_metrics(run_dir / "metrics.jsonl"), messages


def test_async_run_writes_a_complete_run_directory(async_run):
    run_dir, result, rows, _ = async_run
    assert result.steps == 6
    settings = json.loads((run_dir / "engine_settings.json").read_text())
    assert settings["logprobs_mode"] == "processed_logprobs"
    assert settings["enable_prefix_caching"] is False
    assert settings["head_dtype"] == "float32"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["max_steps"] == 6
    assert "vllm" in json.loads((run_dir / "versions.json").read_text())
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000003",
                                                                          "step-000006"]
    assert (run_dir / "plots" / "training.png").stat().st_size > 10_000
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_async_run_logs_the_metric_vocabulary(async_run):
    _, _, rows, _ = async_run
    for key in ("rl/ratio_mean", "rl/ratio_min", "rl/ratio_max", "rl/clip_frac", "rl/kl_k3",
                "rl/entropy", "rl/reward_mean", "rl/advantage_mean", "lag/mean", "lag/max",
                "sync/seconds", "throughput/tokens_per_s", "throughput/samples_per_s"):
        assert all(key in r for r in rows), key
    assert any(r["rl/grad_norm"] > 0 for r in rows)  # the dense reward gives real gradients


def test_same_version_tokens_match_the_trainer_in_fp32(async_run):
    _, _, rows, messages = async_run
    mismatch = measured(rows, "mismatch/max_abs_diff")
    assert len(mismatch) >= 4, "parity was measured on too few steps"
    assert max(mismatch) <= 1e-5
    assert all(v == 0.0 for v in measured(rows, "rl/clip_frac_on_policy"))
    assert not any("parity alarm" in m for m in messages)


def test_weights_are_updated_in_flight(async_run):
    _, _, rows, _ = async_run
    assert max(r["lag/mixed_version_frac"] for r in rows) > 0, "no rollout spans an update"
    assert max(r["lag/max"] for r in rows) >= 1


def test_sync_mode_is_on_policy_and_bitwise_mode_makes_it_exact(tiny_model, prompts_file,
                                                                 tmp_path):
    # Sync mode in the default parity mode: test_story.py (the reference config, max |Δ| < 1e-5).
    # Here in bitwise mode (trainer/engine_kernels.py): every token equal, every ratio exactly 1.
    cfg = build_config(make_config(tiny_model, prompts_file, mode="sync", max_steps=3,
                                   **{"parity.mode": "bitwise", "sampling.top_p": 0.9}))
    run_training(cfg, tmp_path, on_message=lambda m: None)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["lag/max"] for r in rows] == [0, 0, 0]
    assert all(r["rl/clip_frac"] == 0 for r in rows)
    assert all(r["mismatch/tokens"] == r["rl/tokens"] > 0 for r in rows)
    assert all(r["mismatch/max_abs_diff"] == 0.0 for r in rows)
    assert all(r["rl/ratio_min"] == r["rl/ratio_max"] == 1.0 for r in rows)
    assert all(r["engine/preemptions"] == 0 for r in rows)
    settings = json.loads((tmp_path / "engine_settings.json").read_text())
    assert settings["cpu_attn_split_kv"] is False and settings["single_row_gemm_padded"] is True


def test_v1_defaults_show_the_seed_bug_and_the_alarm_stops_the_run(tiny_model, prompts_file,
                                                                   tmp_path):
    cfg = build_config(make_config(
        tiny_model, prompts_file, mode="sync", max_steps=3,
        **{"engine.logprobs_mode": "raw_logprobs", "engine.enable_prefix_caching": True,
           "engine.lm_head_dtype": "model", "parity.on_alarm": "stop"}))
    with pytest.raises(ParityAlarm, match="parityrl doctor"):
        run_training(cfg, tmp_path, on_message=lambda m: None)
    (first,) = read_metrics(tmp_path / "metrics.jsonl")  # stopped after its first step
    assert first["lag/max"] == 0  # an on-policy step ...
    assert first["mismatch/mean_abs_diff"] >= 1e-2  # ... with the semantic offset
    assert first["rl/clip_frac"] > 0  # ... already clipping


def test_killed_run_resumes_without_lost_or_duplicated_steps_and_leaves_nothing_in_dev_shm(
        tiny_model, prompts_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(make_config(
        tiny_model, prompts_file, max_steps=6, **{"checkpoint.every": 2})))
    run_dir = tmp_path / "run"
    proc = start_train(str(config), "--out", str(run_dir))
    try:
        wait_while_running(proc, lambda: metric_rows(run_dir) >= 3)
        held = shm_of(proc.pid)  # the weights file, vLLM's segments
    finally:
        kill_group(proc)  # SIGKILL to the CLI and the engine processes it started
    killed_at = time.time()
    assert any("parityrl-weights-" in p for p in held) and any("psm_" in p for p in held), held
    assert wait_gone(held) == set()  # the run's guardian reclaimed them (parityrl/shm_guard.py)
    before = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert len(before) >= 3 and before[-1] < 6

    resumed = subprocess.run(train_cmd("--resume", str(run_dir)), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # A clean exit: no task left pending, no segment removed behind the resource tracker's back.
    for noise in ("Task was destroyed but it is pending", "resource_tracker"):
        assert noise not in resumed.stderr, resumed.stderr[-2000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    last_checkpoint = max(s for s in before if s % 2 == 0)
    assert all(r["time"] < killed_at for r in rows if r["step"] <= last_checkpoint)
    assert all(r["time"] > killed_at for r in rows if r["step"] > last_checkpoint)
    assert (run_dir / "checkpoints" / "step-000006" / "model.safetensors").exists()
