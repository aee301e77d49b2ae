"""Mixture-of-experts models (issue 28, first part): a tiny Qwen3-MoE built locally, its weights
pushed under the checkpoint's names, a float64 reference that runs its experts, and the doctor's
last rung passing on the real vLLM CPU engine after an in-place push (which needed the CPU
experts' prepack re-run: engine/worker_extension.py `_repack_cpu_experts`)."""

from __future__ import annotations

import pytest
import torch

from parityrl.sampling import SamplingConfig


@pytest.fixture(scope="module")
def moe_model(model_factory) -> str:
    return model_factory("qwen3-moe")


def test_a_tiny_moe_pushes_its_experts_under_the_checkpoints_names_and_scores_in_float64(
        moe_model):
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from parityrl.models.load import checkpoint_state_dict, load_policy
    from parityrl.trainer.logprobs import token_logprobs
    from parityrl.trainer.precision import Float64Reference

    config = json.loads((Path(moe_model) / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["num_experts_per_tok"] == 2 and config["norm_topk_prob"] is True
    model = load_policy(moe_model, "float32")
    # In memory transformers fuses each layer's experts into 3-D tensors; the engine loads the
    # checkpoint's per-expert tensors, and that is what a push must send.
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in model.state_dict())
    on_disk = load_file(str(Path(moe_model) / "model.safetensors"))
    pushed = checkpoint_state_dict(model)
    assert set(pushed) == set(on_disk)
    assert all(torch.equal(pushed[name], on_disk[name]) for name in on_disk)

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    ones = torch.ones_like(ids)
    completion = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    with torch.no_grad():
        lp32 = token_logprobs(model, ids, ones, completion, sampling)
        lp64 = token_logprobs(Float64Reference(model).model, ids, ones, completion, sampling)
    assert lp64.logprobs.dtype == torch.float64
    diff = (lp32.logprobs.double() - lp64.logprobs)[lp32.mask].abs().max()
    assert 0 < diff < 1e-5


@pytest.mark.slow
def test_the_doctor_passes_a_tiny_moe_after_an_in_place_weight_push(moe_model):
    from parityrl.doctor.ladder import DoctorConfig, build_ladder, run_ladder_sync
    from parityrl.doctor.verdict import judge

    cfg = DoctorConfig(model=moe_model, num_samples=3, prompts=["12+7=", "abc", "x = [1, 2"],
                       samplings=[SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=24)])
    results, floor = run_ladder_sync(cfg, rungs=build_ladder()[-1:])
    (last,) = results
    assert last.sync_ok is True and last.metrics["mismatch/tokens"] > 0
    verdict = judge(results, floor, "float32")
    assert verdict.passed, verdict.text
    assert last.metrics["mismatch/max_abs_diff"] < 1e-4
