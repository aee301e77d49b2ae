"""The float64 reference: the trainer's own rounding error, and the per-token rule built on it."""

import torch

from parityrl.doctor.rungs import RungResult
from parityrl.models.load import load_policy
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.trainer.batch import rollout_logprobs
from parityrl.trainer.float64 import exact_logprobs, precision_metrics, within_precision

SAMPLING = SamplingConfig(temperature=0.7, max_tokens=8)


def _rollouts() -> list[Rollout]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(6):
        prompt = torch.randint(3, 60, (5 + i,), generator=gen).tolist()
        completion = torch.randint(3, 60, (4 + i % 3,), generator=gen).tolist()
        out.append(Rollout(prompt, completion, [0.0] * len(completion), [0] * len(completion), "length"))
    return out


def test_float64_reference_is_float64_and_close_to_the_float32_trainer(tiny_model):
    model = load_policy(tiny_model, "float32")
    rollouts = _rollouts()
    exact = exact_logprobs(model, rollouts, SAMPLING, pad_id=0)
    fp32 = torch.cat([r.logprobs for r in rollout_logprobs(model, rollouts, SAMPLING, pad_id=0)])
    assert exact.dtype == torch.float64 and exact.shape == fp32.shape
    error = (fp32.double() - exact).abs()
    assert 0 < error.max() < 1e-4  # float32 rounding: never zero, never large on this model
    assert next(model.parameters()).dtype == torch.float32  # the trainer's model is untouched


def test_precision_metrics_count_what_rounding_does_not_explain():
    exact = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=torch.float64)
    train = exact + torch.tensor([0.0, 2e-5, 0.0, 0.0], dtype=torch.float64)  # trainer's own error
    engine = exact + torch.tensor([0.0, -1e-5, 5e-5, 0.0], dtype=torch.float64)
    m = precision_metrics(train, engine, exact, tol=1e-5)
    assert abs(m["mismatch/precision_error_max"] - 2e-5) < 1e-12
    assert abs(m["mismatch/engine_error_max"] - 5e-5) < 1e-12
    assert m["mismatch/beyond_tol_frac"] == 0.5  # tokens 1 (|Δ| 3e-5) and 2 (|Δ| 5e-5)
    assert m["mismatch/beyond_precision_frac"] == 0.25  # token 1 is within 1e-5 + 2 × 2e-5


def _rung(engine_error, trainer_error, **settings):
    base = {"logprobs_mode": "processed_logprobs", "head_dtype": "float32",
            "trainer_fp32_lm_head": True, "trainer_dtype": "float32"}
    metrics = {"mismatch/mean_abs_diff": 1e-6, "mismatch/max_abs_diff": 3e-5,
               "mismatch/mean_diff": 0.0, "mismatch/clip_frac@0.2": 0.0}
    return RungResult("fp32-lm-head", "numerics", SAMPLING, base | settings, metrics, [], [],
                      engine_error=engine_error, trainer_error=trainer_error)


def _err(mean, p99):
    return {"mean": mean, "p99": p99, "max": 2 * p99}


def test_rule_passes_an_engine_as_close_to_float64_as_the_trainer():
    from parityrl.doctor.verdict import ENGINE_ERROR_FACTOR, judge

    ok = _rung(_err(3e-6, 2e-5), _err(1.5e-6, 1e-5))  # 2x: two float32 implementations
    v = judge([ok], {}, "float32")
    assert v.passed and v.sentence.startswith("PASS") and "2×" in v.sentence
    far = ENGINE_ERROR_FACTOR * 1.5
    bad = _rung(_err(1.5e-6 * far, 1e-5), _err(1.5e-6, 1e-5))
    v = judge([ok, bad], {}, "float32")
    assert not v.passed and v.culprit == "numerics" and "from rung 'fp32-lm-head'" in v.sentence
    # The p99 counts too: a tail the trainer does not have.
    assert not judge([_rung(_err(1.5e-6, 1e-5 * far), _err(1.5e-6, 1e-5))], {}, "float32").passed
    # An exact match on both sides is consistent (no ratio of zeros).
    assert judge([_rung(_err(0.0, 0.0), _err(0.0, 0.0))], {}, "float32").passed


def test_rule_fails_settings_that_disagree_whatever_the_numbers():
    from parityrl.doctor.verdict import judge

    close = (_err(1e-2, 0.1), _err(1e-2, 0.1))
    head = judge([_rung(*close, head_dtype="bfloat16", trainer_dtype="bfloat16")], {}, "bfloat16")
    assert not head.passed and head.culprit == "numerics" and "bfloat16" in head.sentence
    raw = judge([_rung(*close, logprobs_mode="raw_logprobs")], {}, "float32")
    assert not raw.passed and raw.culprit == "semantics"
    unpushed = judge([_rung(*close, weights_pushed=False)], {}, "float32")
    assert not unpushed.passed and unpushed.culprit == "weight synchronisation"


def test_absolute_tol_replaces_the_rule_when_given():
    from parityrl.doctor.verdict import judge

    r = _rung(_err(3e-6, 2e-5), _err(1.5e-6, 1e-5))  # max |Δ| 3e-5
    assert not judge([r], {}, "float32", tol=1e-5).passed
    assert judge([r], {}, "float32", tol=1e-4).passed
    assert bool(within_precision(torch.tensor(3e-5), torch.tensor(1e-5), 1e-5))
