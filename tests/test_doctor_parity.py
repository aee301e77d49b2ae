"""The doctor's ladder on the real vLLM CPU engine, on tiny local models.

The full ladder runs once (qwen2, three samplings on one engine per rung); the tied-embedding and
llama variants run the rungs where they differ: the weight push and the fp32 lm_head, whose packed
copy a tied model shares with its embedding.
"""

from __future__ import annotations

import pytest

from parityrl.doctor.ladder import BASELINE, DoctorConfig, build_ladder, run_ladder_sync
from parityrl.doctor.report import by_sampling, judge_all
from parityrl.doctor.verdict import judge
from parityrl.sampling import SamplingConfig

pytestmark = pytest.mark.slow

SAMPLINGS = {
    "temperature 0.7": SamplingConfig(temperature=0.7, max_tokens=24),
    "top-p 0.9": SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=24),
    "top-k 20": SamplingConfig(temperature=0.7, top_k=20, max_tokens=24),
}
PROMPTS = ["12+7=", "The quick brown fox", "x = [1, 2"]


@pytest.fixture(scope="module")
def ladder(tiny_model):
    cfg = DoctorConfig(model=tiny_model, samplings=list(SAMPLINGS.values()), num_samples=3,
                       prompts=PROMPTS)
    results, floor = run_ladder_sync(cfg)
    return {label: [r for r in results if r.sampling == s] for label, s in SAMPLINGS.items()}, floor


def test_first_rung_is_what_vllm_resolves_when_given_nothing(ladder):
    by_sampling_, _ = ladder
    first = by_sampling_["temperature 0.7"][0]
    assert first.name == BASELINE
    s = first.settings
    assert s["logprobs_mode"] == "raw_logprobs"
    assert s["enable_prefix_caching"] is True and s["enable_chunked_prefill"] is True
    assert s["enforce_eager"] is False and s["compilation_mode"] != "0"  # compiled
    assert s["generation_config"] == "auto"
    assert s["head_dtype"] == "float32"  # the model dtype here
    assert s["async_scheduling"] is False  # what the CPU platform forces


@pytest.mark.parametrize("label", list(SAMPLINGS))
def test_defaults_show_the_semantic_offset_and_every_fix_reaches_parity(ladder, label):
    by_sampling_, floor = ladder
    results = by_sampling_[label]
    assert [r.name for r in results] == [BASELINE, "processed-logprobs", "explicit-runtime",
                                         "weight-sync", "fp32-lm-head"]
    assert results[0].metrics["mismatch/mean_abs_diff"] >= 1e-2
    for later in results[1:]:
        assert later.metrics["mismatch/max_abs_diff"] <= 1e-5, later.name
        assert later.metrics["mismatch/clip_frac@0.2"] == 0.0
        assert later.engine_error["mean"] <= 4 * later.trainer_error["mean"] + 1e-9
    assert all(r.sync_ok for r in results if r.name in ("weight-sync", "fp32-lm-head"))
    assert results[-1].settings["head_dtype"] == "float32"
    verdict = judge(results, floor, "float32")
    assert verdict.passed, verdict.text
    assert verdict.sentence.startswith("PASS: at the last rung 'fp32-lm-head'")
    assert any("'processed-logprobs'" in line and "semantics" in line for line in verdict.lines)


@pytest.mark.parametrize("variant", ["qwen2-tied", "llama", "llama-tied"])
def test_weight_push_and_fp32_head_reach_parity_for_every_variant(model_factory, variant):
    cfg = DoctorConfig(model=model_factory(variant), samplings=[SAMPLINGS["top-p 0.9"]],
                       num_samples=3, prompts=PROMPTS)
    # The last rung alone: the trainer perturbs its weights, pushes them, fp32 head on both sides.
    results, floor = run_ladder_sync(cfg, rungs=build_ladder()[-1:])
    assert [r.name for r in results] == ["fp32-lm-head"]
    for r in results:
        assert r.sync_ok, r.sync_check
        assert r.metrics["mismatch/max_abs_diff"] <= 1e-5, (variant, r.name)
    passed, verdicts = judge_all(results, floor, "float32")
    assert passed, verdicts[0].text
    assert len(by_sampling(results)) == 1
