"""The float64 reference: the trainer's own rounding error, and the per-token rule built on it."""

import torch

from parityrl.doctor.ladder import RungResult
from parityrl.doctor.report import tolerance_check
from parityrl.models.load import load_policy
from parityrl.rollouts.types import Rollout
from parityrl.sampling import SamplingConfig
from parityrl.trainer.batch import rollout_logprobs
from parityrl.trainer.precision import exact_logprobs, precision_metrics, within_precision

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


def _rung(diffs, errors):
    return RungResult("fp32-lm-head", "numerics", SAMPLING, {}, {}, diffs, list(range(len(diffs))),
                      precision_error=errors)


def test_doctor_passes_tokens_within_rounding_and_fails_the_rest():
    assert tolerance_check([_rung([1e-6, 3e-5], [0.0, 2e-5])], 1e-5)["failing"] == 0
    check = tolerance_check([_rung([1e-6, 3e-5], [0.0, 1e-6])], 1e-5)
    assert (check["beyond_tol"], check["failing"]) == (1, 1)
    # Without a float64 reference the tolerance alone decides.
    assert tolerance_check([_rung([1e-6, 3e-5], None)], 1e-5)["failing"] == 1
    assert bool(within_precision(torch.tensor(3e-5), torch.tensor(1e-5), 1e-5))
