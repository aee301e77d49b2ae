"""The seed's story, replayed: the shipped reference / v1-defaults pair, trained for real, compared.

Short runs (a few steps each) of configs/reference.yaml (two seeds) and configs/v1-defaults.yaml on
the built-in warm-started tiny model, then `parityrl compare` on them; and the v1-defaults engine in
a run whose parity alarm stops it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from parityrl.compare import compare_runs
from parityrl.config import load_config
from parityrl.pipeline import run_training
from parityrl.runlog import read_metrics

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parent.parent / "configs"
STEPS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, config, seed in [("reference", "reference.yaml", 0),
                               ("reference-seed1", "reference.yaml", 1),
                               ("v1-defaults", "v1-defaults.yaml", 0)]:
        # An eighth of the shipped batch (8 prompts × 8 samples a step) keeps the suite short.
        cfg = load_config(CONFIGS / config, [f"max_steps={STEPS}", f"seed={seed}",
                                             "actor.prompts_per_step=8"])
        run_dir = tmp_path_factory.mktemp("story") / name
        run_training(cfg, run_dir, on_message=lambda m: None)
        out[name] = run_dir
    return out


def test_v1_defaults_mismatch_from_the_first_on_policy_step(runs):
    ref = read_metrics(runs["reference"] / "metrics.jsonl")
    v1 = read_metrics(runs["v1-defaults"] / "metrics.jsonl")
    assert all(r["lag/max"] == 0 for r in ref + v1)  # the shipped pair runs on-policy (sync)
    assert all(r["mismatch/mean_abs_diff"] >= 1e-3 and r["rl/clip_frac"] > 0 for r in v1)
    assert all(r["mismatch/mean_abs_diff"] < 1e-5 and r["rl/clip_frac"] == 0 for r in ref)


def test_reference_engine_is_as_close_to_exact_arithmetic_as_the_trainer(runs):
    # fp64_reference (both configs): the parity tokens are also scored in float64. On this model
    # the trainer's own float32 error reaches ~1e-5-3e-5 per step, so a 1e-5 bound on max |Δ| is
    # not what fp32 can promise; what it can: the engine is no further from exact than the trainer.
    for name in ("reference", "reference-seed1"):
        for r in read_metrics(runs[name] / "metrics.jsonl"):
            # The doctor's rule, per step: the engine's mean error within 4× the trainer's own.
            assert r["mismatch/engine_error_ratio"] <= 4
            assert r["mismatch/beyond_precision_frac"] <= 0.01
    for r in read_metrics(runs["v1-defaults"] / "metrics.jsonl"):
        assert r["mismatch/engine_error_max"] > 100 * r["mismatch/precision_error_max"]
        assert r["mismatch/engine_error_ratio"] > 100
        assert r["mismatch/beyond_precision_frac"] > 0.5


def test_compare_flags_the_candidate_and_names_the_settings(runs):
    result = compare_runs(runs["reference"], [runs["v1-defaults"]])
    at = {r.metric: r.diverged_at["v1-defaults"] for r in result.results}
    assert result.diverged
    assert at["rl/clip_frac"] is not None and at["rl/clip_frac"] <= 3
    assert at["mismatch/kl_k3"] is not None and at["mismatch/kl_k3"] <= 3
    assert at["rl/kl_k3"] is not None and at["rl/kl_k3"] <= 3
    for setting in ("engine.logprobs_mode", "engine.enable_prefix_caching"):  # as vLLM resolved
        assert setting in result.diff and setting in result.verdict, setting
    # An fp32 model resolves both lm_head settings to float32; the configs still differ.
    assert result.diff["config.engine.lm_head_dtype"] == ["float32", "model"]


def test_compare_does_not_flag_another_seed_of_the_reference_on_parity(runs):
    """Another seed of the reference agrees on what the story is about: the mismatch and the
    clip rate it causes. Learning curves of two seeds may drift apart beyond the reference's own
    step-to-step noise (measured here: rl/logprob_mean and rl/entropy of seed 1 left seed 0's
    band from step 10 of 12 on an AVX-512 Xeon): that is what extra reference seeds are for
    (`--ref`), as below."""
    parity = ["rl/clip_frac", "rl/kl_k3", "mismatch/kl_k3", "lag/mean"]
    result = compare_runs(runs["reference"], [runs["reference-seed1"]], metrics=parity)
    assert not result.diverged, result.verdict


def test_with_a_second_reference_seed_the_candidate_is_still_flagged_early(runs):
    # The band widened to the spread between the two reference seeds.
    result = compare_runs(runs["reference"], [runs["v1-defaults"]], [runs["reference-seed1"]])
    at = {r.metric: r.diverged_at["v1-defaults"] for r in result.results}
    assert result.diverged
    assert at["rl/clip_frac"] is not None and at["rl/clip_frac"] <= 3
    assert at["mismatch/kl_k3"] is not None and at["mismatch/kl_k3"] <= 3


def test_v1_defaults_show_the_seed_bug_and_the_alarm_stops_the_run(tiny_model, tmp_path,
                                                                   plugins_importable):
    """The engine section of the shipped configs/v1-defaults.yaml in a run with the alarm set to
    stop: it stops after its first step, on-policy, with the semantic offset, already clipping."""
    from helpers import digit_share_config, write_addition_rows

    from parityrl.config import build_config
    from parityrl.pipeline import ParityAlarm

    shipped = yaml.safe_load((CONFIGS / "v1-defaults.yaml").read_text())["engine"]
    prompts = write_addition_rows(tmp_path / "prompts.jsonl")
    cfg = build_config(digit_share_config(tiny_model, prompts, **{
        "mode": "sync", "max_steps": 3, "parity.on_alarm": "stop",
        **{f"engine.{k}": v for k, v in shipped.items()}}))
    assert cfg.engine.logprobs_mode == "raw_logprobs" and cfg.engine.enable_prefix_caching
    with pytest.raises(ParityAlarm, match="parityrl doctor"):
        run_training(cfg, tmp_path / "run", on_message=lambda m: None)
    (first,) = read_metrics(tmp_path / "run" / "metrics.jsonl")  # stopped after its first step
    assert first["lag/max"] == 0  # an on-policy step ...
    assert first["mismatch/mean_abs_diff"] >= 1e-2  # ... with the semantic offset
    assert first["rl/clip_frac"] > 0  # ... already clipping
