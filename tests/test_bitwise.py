"""Bitwise mode (parity.mode=bitwise, doctor --bitwise): the trainer's logprobs equal the engine's.

The real vLLM CPU engine generates; the trainer scores the same tokens with the engine's kernels
(trainer/engine_kernels.py); every token must be equal (`torch.equal`, not a tolerance). Models:
the tiny untied Qwen2, and a tiny tied Llama whose MLP is 1280 wide, where oneDNN's one-row GEMM
rounds differently from its batched one: a single request (every decode step one row) shows that
the engine's padding of one-row GEMMs is what makes it hold. The real model (SmolLM2, 30 layers,
float32) runs the same rung in test_real_model.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from parityrl.config import load_config
from parityrl.doctor.ladder import DoctorConfig, build_ladder, run_ladder_sync
from parityrl.doctor.verdict import judge
from parityrl.errors import UserError
from parityrl.sampling import SamplingConfig

SAMPLINGS = [SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=32),
             SamplingConfig(temperature=1.0, max_tokens=32)]
PROMPTS = ["12+7=", "The quick brown fox", "x = [1, 2", "Once upon a time"]


def _bitwise_rung(withhold_padding: bool = False):
    rung = build_ladder(bitwise=True)[-1]
    if withhold_padding:  # the engine's own one-row GEMM, everything else as bitwise mode has it
        from dataclasses import replace

        fixes = tuple(replace(f, engine={**f.engine, "pad_single_row_gemm": False})
                      if f.name == "bitwise" else f for f in rung.fixes)
        rung = replace(rung, fixes=fixes)
    return rung


def _check_equal(results, min_tokens: int = 50) -> None:
    for r in results:
        assert r.name == "bitwise"
        assert r.sync_ok, r.sync_check  # the rung pushed perturbed weights first
        assert len(r.abs_diffs) >= min_tokens
        assert all(d == 0.0 for d in r.abs_diffs), (r.sampling, max(r.abs_diffs))
        assert r.settings["cpu_attn_split_kv"] is False
        assert r.settings["single_row_gemm_padded"] is True
        verdict = judge([r], {}, "float32")
        assert verdict.passed, verdict.text
        assert "every one of" in verdict.sentence


@pytest.mark.slow
def test_doctor_bitwise_rung_is_exact_on_tiny_qwen2(tiny_model):
    cfg = DoctorConfig(model=tiny_model, samplings=SAMPLINGS, num_samples=3, prompts=PROMPTS)
    results, _ = run_ladder_sync(cfg, rungs=[_bitwise_rung()])
    _check_equal(results)


@pytest.mark.slow
def test_doctor_bitwise_rung_is_exact_on_a_tied_llama_down_to_single_row_decodes(model_factory):
    # One request at a time: every decode step is a one-row GEMM in the engine, which the engine
    # pads to two rows in bitwise mode (batched decodes: the Qwen2 test above).
    alone = DoctorConfig(model=model_factory("llama-tied-wide"), samplings=SAMPLINGS,
                         num_samples=1, prompts=PROMPTS[:1])
    results, _ = run_ladder_sync(alone, rungs=[_bitwise_rung()])
    assert len(results) == 2
    _check_equal(results, min_tokens=20)


@pytest.mark.slow
def test_without_the_engines_gemm_padding_single_row_decodes_differ(model_factory):
    alone = DoctorConfig(model=model_factory("llama-tied-wide"), samplings=SAMPLINGS[:1],
                         num_samples=1, prompts=PROMPTS[:1])
    (r,), _ = run_ladder_sync(alone, rungs=[_bitwise_rung(withhold_padding=True)])
    assert r.settings["single_row_gemm_padded"] is False
    # A run refuses such an engine at its start; the doctor measures it and names the setting.
    assert sum(d > 0 for d in r.abs_diffs) > 0
    verdict = judge([r], {}, "float32")
    assert not verdict.passed and verdict.culprit == "kernels"
    assert "single_row_gemm_padded=False" in verdict.sentence and "tokens differ" in verdict.sentence


def test_bitwise_gradient_is_the_default_gradient_and_values_come_from_the_kernels(tiny_model):
    from parityrl.models.load import load_policy
    from parityrl.trainer.engine_kernels import EngineKernels
    from parityrl.trainer.logprobs import token_logprobs

    model = load_policy(tiny_model, "float32")
    kernels = EngineKernels(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (3, 20), generator=gen)
    attention = torch.ones_like(ids)
    attention[2, 15:] = 0
    completion = torch.zeros_like(ids)
    completion[:, 8:] = 1
    # No top-p: these tokens are random, not sampled, and most lie outside a nucleus.
    sampling = SamplingConfig(temperature=0.7)
    weights = torch.randn(3, 19, generator=gen)

    def grads(**kw):
        model.zero_grad()
        out = token_logprobs(model, ids, attention, completion, sampling, **kw)
        ((out.logprobs * weights)[out.mask].sum() + out.entropy[out.mask].sum()).backward()
        return out, [p.grad.clone() for p in model.parameters()]

    default, g_default = grads()
    bitwise, g_bitwise = grads(kernels=kernels)
    assert torch.equal(default.mask, bitwise.mask)
    for a, b in zip(g_default, g_bitwise):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Values: the kernels' (no grad), equal to what the gradient path reports, and within float32
    # rounding of the default forward's.
    with torch.no_grad():
        exact = token_logprobs(model, ids, attention, completion, sampling, kernels=kernels)
    assert torch.equal(exact.logprobs, bitwise.logprobs.detach())
    diff = (exact.logprobs - default.logprobs.detach())[default.mask].abs()
    assert 0 < diff.max() < 1e-4
    # An optimizer step moves the weights in place: the kernels re-pack before the next pass.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
        moved = token_logprobs(model, ids, attention, completion, sampling, kernels=kernels)
        fresh = token_logprobs(model, ids, attention, completion, sampling,
                               kernels=EngineKernels(model))
    assert torch.equal(moved.logprobs, fresh.logprobs)
    assert not torch.equal(moved.logprobs, exact.logprobs)


@pytest.mark.slow
def test_a_bitwise_training_run_has_zero_mismatch_and_no_on_policy_clip(tiny_model, tmp_path):
    from parityrl.pipeline import run_training

    cfg = load_config(None, [f"model={tiny_model}", "parity.mode=bitwise", "mode=sync",
                             "max_steps=3", "actor.prompts_per_step=8", "actor.group_size=4",
                             "sampling.temperature=0.7", "sampling.top_p=0.9",
                             "sampling.max_tokens=12", "trainer.optim.lr=1e-3",
                             "tensorboard=false", "samples_every=0"])
    run_training(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["mismatch/max_abs_diff"] == 0.0
        assert row["mismatch/tokens"] > 0
        assert row["rl/clip_frac_on_policy"] == 0.0
        assert row["engine/preemptions"] == 0.0
    settings = json.loads((tmp_path / "run" / "engine_settings.json").read_text())
    assert settings["cpu_attn_split_kv"] is False and settings["single_row_gemm_padded"] is True


@pytest.mark.parametrize("overrides, message", [
    (["dtype=bfloat16"], "float32 only"),
    (["engine.enable_prefix_caching=true"], "engine.enable_prefix_caching=False"),
    (["engine.cpu_attn_split_kv=true"], "engine.cpu_attn_split_kv=False"),
    (["env.type=calculator"], "single-turn"),
])
def test_bitwise_mode_refuses_what_it_cannot_hold_at_load(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ["parity.mode=bitwise", *overrides])


def test_bitwise_mode_sets_the_engine_knobs_it_needs():
    cfg = load_config(None, ["parity.mode=bitwise"])
    assert cfg.engine.cpu_attn_split_kv is False and cfg.engine.pad_single_row_gemm is True
    assert cfg.engine.enforce_eager and not cfg.engine.enable_chunked_prefill
    assert load_config(None, []).engine.pad_single_row_gemm is False


def test_an_engine_without_the_bitwise_settings_is_refused_in_one_line():
    from parityrl.trainer.engine_kernels import check_engine_for_bitwise

    resolved = {"device": "cpu", "dtype": "float32", "enforce_eager": True,
                "enable_chunked_prefill": False, "enable_prefix_caching": False,
                "async_scheduling": False, "logprobs_mode": "processed_logprobs",
                "cpu_attn_split_kv": True, "single_row_gemm_padded": True,
                "vllm_version": "0.32.0"}
    with pytest.raises(UserError, match="cpu_attn_split_kv=True") as e:
        check_engine_for_bitwise(resolved)
    assert "\n" not in str(e.value)
    check_engine_for_bitwise(resolved | {"cpu_attn_split_kv": False})


@pytest.mark.slow
def test_preemptions_are_counted_and_named_by_the_bitwise_verdict(tiny_model):
    from dataclasses import replace

    rung = _bitwise_rung()
    # 8 KV blocks of 128 tokens for 8 requests that each grow past one block: the scheduler
    # must preempt some of them.
    small = tuple(replace(f, engine={**f.engine, "kv_cache_gib": 8 * 128 * 512 / 2**30})
                  if f.name == "bitwise" else f for f in rung.fixes)
    cfg = DoctorConfig(model=tiny_model, prompts=["7" * 100, "8" * 100],
                       samplings=[SamplingConfig(temperature=1.0, max_tokens=80)],
                       num_samples=4)
    (r,), _ = run_ladder_sync(cfg, rungs=[replace(rung, fixes=small)])
    assert r.metrics["engine/preemptions"] > 0
    verdict = judge([r], {}, "float32")
    if not verdict.passed:  # a recomputed request may or may not round differently
        assert "preempted" in verdict.sentence
