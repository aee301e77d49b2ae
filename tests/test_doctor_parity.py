"""The doctor's ladder on the real vLLM CPU engine, for every tiny model variant.

One ladder run per variant measures each rung under three sampling settings (sampling is per
request, so one engine start serves all three).
"""

from __future__ import annotations

import pytest

from parityrl.doctor.ladder import DoctorConfig, run_ladder_sync
from parityrl.doctor.report import verdict
from parityrl.sampling import SamplingConfig

pytestmark = pytest.mark.slow

SAMPLINGS = {
    "temperature 0.7": SamplingConfig(temperature=0.7, max_tokens=24),
    "top-p 0.9": SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=24),
    "top-k 20": SamplingConfig(temperature=0.7, top_k=20, max_tokens=24),
}


@pytest.fixture(scope="module", params=["qwen2", "qwen2-tied", "llama", "llama-tied"])
def ladder(request, model_factory):
    cfg = DoctorConfig(model=model_factory(request.param), samplings=list(SAMPLINGS.values()),
                       num_samples=3, prompts=["12+7=", "The quick brown fox", "x = [1, 2"])
    results, floor = run_ladder_sync(cfg)
    return {label: [r for r in results if r.sampling == s] for label, s in SAMPLINGS.items()}, floor


@pytest.mark.parametrize("label", list(SAMPLINGS))
def test_defaults_show_the_semantic_offset_and_every_fix_reaches_parity(ladder, label):
    by_sampling, floor = ladder
    results = by_sampling[label]
    assert [r.name for r in results] == ["engine-defaults", "processed-logprobs",
                                         "explicit-runtime", "weight-sync", "fp32-lm-head"]
    assert results[0].metrics["mismatch/mean_abs_diff"] >= 1e-2
    assert results[0].settings["logprobs_mode"] == "raw_logprobs"
    assert results[0].settings["enable_prefix_caching"] is True
    for later in results[1:]:
        assert later.metrics["mismatch/max_abs_diff"] <= 1e-5, later.name
        assert later.metrics["mismatch/clip_frac@0.2"] == 0.0
    assert all(r.sync_ok for r in results if r.name in ("weight-sync", "fp32-lm-head"))
    assert results[-1].settings["head_dtype"] == "float32"
    text, passed = verdict(results, floor, tol=1e-5)
    assert passed
    assert "semantics" in text.splitlines()[0] and "processed-logprobs" in text.splitlines()[0]
