"""The doctor's ladder on the real vLLM CPU engine, on tiny local models.

The parity rungs run once (qwen2, three samplings on one engine per rung: raw vs processed at
vLLM's defaults, then the explicit, eager settings with and without a weight push and the fp32
head). Tied embeddings differ at the last rung (the weight push and the fp32 lm_head, whose packed
copy a tied model shares with its embedding): SmolLM2 is a tied llama, and test_real_model.py and
the CLI doctor test in test_cli.py run that rung on it, test_bitwise.py the bitwise rung on a tiny
tied llama. The first rung, vLLM's compiled defaults, runs on its own engine.
"""

from __future__ import annotations

import pytest

from parityrl.doctor.ladder import run_ladder_sync
from parityrl.doctor.rungs import LadderConfig, build_ladder
from parityrl.doctor.verdict import consistency, judge
from parityrl.core.sampling import SamplingConfig

pytestmark = pytest.mark.slow

SAMPLINGS = {
    "temperature 0.7": SamplingConfig(temperature=0.7, max_tokens=24),
    "top-p 0.9": SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=24),
    "top-k 20": SamplingConfig(temperature=0.7, top_k=20, max_tokens=24),
}
PROMPTS = ["12+7=", "The quick brown fox", "x = [1, 2"]


# The ladder from the explicit runtime on, with the semantics fix withheld on an extra first rung:
# raw logprobs against processed ones under the same (eager) settings.
def _rungs():
    ladder = build_ladder()
    raw = build_ladder(frozenset({"processed-logprobs"}))[2]
    return [raw, *ladder[2:]]


@pytest.fixture(scope="module")
def ladder(tiny_model):
    cfg = LadderConfig(model=tiny_model, samplings=list(SAMPLINGS.values()), num_samples=3,
                       prompts=PROMPTS)
    results, floor = run_ladder_sync(cfg, rungs=_rungs())
    return {label: [r for r in results if r.sampling == s] for label, s in SAMPLINGS.items()}, floor


@pytest.mark.parametrize("label", list(SAMPLINGS))
def test_raw_logprobs_show_the_semantic_offset_and_every_fix_reaches_parity(ladder, label):
    by_sampling_, floor = ladder
    raw, *results = by_sampling_[label]
    assert raw.settings["logprobs_mode"] == "raw_logprobs"
    assert raw.metrics["mismatch/mean_abs_diff"] >= 1e-2
    assert [r.name for r in results] == ["explicit-runtime", "weight-sync", "fp32-lm-head"]
    for later in results:
        assert later.metrics["mismatch/max_abs_diff"] <= 1e-5, later.name
        assert later.metrics["mismatch/clip_frac@0.2"] == 0.0
        assert later.engine_error["mean"] <= 4 * later.trainer_error["mean"] + 1e-9
    assert all(r.sync_ok for r in results if r.name in ("weight-sync", "fp32-lm-head"))
    assert results[-1].settings["head_dtype"] == "float32"
    verdict = judge([raw, *results], floor, "float32")
    assert verdict.passed, verdict.text
    assert verdict.sentence.startswith("PASS: at the last rung 'fp32-lm-head'")
    # Withheld, the semantics fix fails and names its layer (test_real_model.py withholds the others).
    alone = judge([raw], floor, "float32")
    assert not alone.passed and alone.culprit == "semantics", alone.text
    assert alone.sentence.startswith("FAIL at the semantics layer")
    state = consistency(raw)
    assert not state.ok and state.ratio > 10, state.why


def test_first_rung_runs_vllm_defaults_and_reports_what_vllm_resolved(tiny_model):
    """Nothing numerics-related passed to vLLM: compiled mode, prefix caching, raw logprobs, the
    folder's generation config, and the notes say so; raw logprobs fail the consistency rule."""
    from parityrl.doctor.report import baseline_notes

    cfg = LadderConfig(model=tiny_model, samplings=[SAMPLINGS["temperature 0.7"]],
                       num_samples=2, prompts=PROMPTS)
    (first,), floor = run_ladder_sync(cfg, rungs=build_ladder()[:1])
    assert first.name == "vllm-defaults"
    s = first.settings
    assert s["enforce_eager"] is False and s["compilation_mode"] != "0"  # 0 = NONE (eager)
    assert s["logprobs_mode"] == "raw_logprobs" and s["generation_config"] == "auto"
    assert s["enable_prefix_caching"] is True and s["async_scheduling"] is False
    notes = " ".join(baseline_notes(s))
    assert "async_scheduling=False" in notes and "vllm/platforms/cpu.py" in notes
    assert not consistency(first).ok
    assert not judge([first], floor, "float32").passed
