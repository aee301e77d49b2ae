"""Bitwise mode (parity.mode=bitwise, doctor --bitwise): the trainer's logprobs equal the engine's.

The real vLLM CPU engine generates; the trainer scores the same tokens with the engine's kernels
(trainer/engine_kernels.py); every token must be equal (not a tolerance). Models: the tiny untied
Qwen2 through the doctor's bitwise rung, and a tiny tied Llama whose MLP is 1280 wide, where
oneDNN's one-row GEMM rounds differently from its batched one on AVX-512 CPUs (not on its AVX2
path): single requests (every decode step one row) show that the engine's padding of one-row GEMMs
makes it hold wherever it matters. A bitwise training run: the last test here. SmolLM2 (30 layers,
float32) is a command in docs/bitwise.md, not a test (suite time): `parityrl doctor --model builtin:smollm2-135m-instruct --quick --bitwise ...`.
"""

from __future__ import annotations

import pytest
import torch

from parityrl.config import load_config
from parityrl.doctor.ladder import run_ladder_sync
from parityrl.doctor.rungs import LadderConfig, build_ladder
from parityrl.doctor.verdict import judge
from parityrl.core.errors import UserError
from parityrl.core.sampling import SamplingConfig

SAMPLINGS = [SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=32),
             SamplingConfig(temperature=1.0, max_tokens=32)]
PROMPTS = ["12+7=", "The quick brown fox", "x = [1, 2", "Once upon a time"]


def _bitwise_rung():
    return build_ladder(bitwise=True)[-1]


def _check_equal(results) -> None:
    for r in results:
        assert r.name == "bitwise"
        assert r.sync_ok, r.sync_check  # the rung pushed perturbed weights first
        assert len(r.abs_diffs) >= 50
        assert all(d == 0.0 for d in r.abs_diffs), (r.sampling, max(r.abs_diffs))
        assert r.settings["cpu_attn_split_kv"] is False
        assert r.settings["single_row_gemm_padded"] is True
        verdict = judge([r], {}, "float32")
        assert verdict.passed, verdict.text
        assert "every one of" in verdict.sentence


@pytest.mark.slow
def test_doctor_bitwise_rung_is_exact_on_tiny_qwen2(tiny_model):
    # One sampling (top-p); T 1.0 runs on the tied Llama below.
    cfg = LadderConfig(model=tiny_model, samplings=SAMPLINGS[:1], num_samples=3, prompts=PROMPTS)
    results, _ = run_ladder_sync(cfg, rungs=[_bitwise_rung()])
    _check_equal(results)


@pytest.mark.slow
def test_on_a_tied_llama_one_row_decodes_are_exact_with_the_engines_gemm_padding(
        model_factory, loop):
    """One engine, bitwise settings but the padding off at start: single requests (every decode
    step a one-row GEMM, K = 1280) differ wherever this CPU's one-row GEMM rounds differently
    from its batched one (a machine fact, measured first: AVX-512 oneDNN yes, its AVX2 path no);
    once the worker pads one-row GEMMs (what bitwise mode does at start) they are equal, at T 0.7
    with top-p and at T 1.0. Then eight requests that outgrow a KV cache of eight blocks: the
    preemptions are counted. A private engine: its KV cache is made too small on purpose."""
    from helpers import private_engine

    from parityrl.engine.settings import BITWISE_KNOBS, EngineSettings
    from parityrl.models.load import load_policy
    from parityrl.trainer.engine_kernels import (EngineKernels, Sequence,
                                                 bitwise_setting_faults, one_row_gemm_differs,
                                                 processed_logprobs)

    model = model_factory("llama-tied-wide")
    kv_bytes_per_block = 2 * 2 * 5 * 32 * 4 * 128  # layers × (K, V) × kv heads × head dim × fp32
    settings = EngineSettings(model=model, **{**BITWISE_KNOBS, "pad_single_row_gemm": False},
                              kv_cache_gib=8 * kv_bytes_per_block / 2**30, max_model_len=256)
    kernels = EngineKernels(load_policy(model, "float32"))

    def differing(engine, sampling, prompts, n=1) -> int:
        rollouts = loop.run_until_complete(engine.generate_many(prompts, sampling, n=n, seed=3))
        logits = kernels.logits([Sequence(r.prompt_ids, r.completion_ids) for r in rollouts])
        sampled = torch.tensor([t for r in rollouts for t in r.completion_ids])
        ours = processed_logprobs(logits, sampling).gather(-1, sampled[:, None]).squeeze(-1)
        engine_lp = torch.tensor([lp for r in rollouts for lp in r.logprobs])
        assert len(engine_lp) >= 20
        return int((ours != engine_lp).sum())

    with private_engine(loop, settings) as engine:
        assert bitwise_setting_faults(engine.resolved_settings()) == [
            "single_row_gemm_padded=False (needs True)"]
        # Every GEMM shape of the model (the MLP's down projection has K = 1280), with the
        # worker's thread count.
        threads = engine.worker_numerics["worker_threads"]
        layer = kernels.layers[0]
        shapes = {tuple(g.layer.weight.shape)
                  for g in (layer.qkv, layer.o, layer.gate_up, layer.down, kernels.head)}
        rounds_apart = any(one_row_gemm_differs(k, n, threads) for n, k in shapes)
        prompt = [5, 17, 9, 30, 22, 7]
        unpadded = differing(engine, SAMPLINGS[0], [prompt])
        assert (unpadded > 0) == rounds_apart, (unpadded, rounds_apart)
        loop.run_until_complete(engine.pad_single_row_gemms(True))
        assert engine.resolved_settings()["single_row_gemm_padded"] is True
        for sampling in SAMPLINGS:
            assert differing(engine, sampling, [prompt]) == 0
        before = engine.preemption_counter.preemptions
        long = SamplingConfig(temperature=1.0, max_tokens=80)
        loop.run_until_complete(engine.generate_many([[7] * 100, [8] * 100], long, n=4, seed=0))
        assert engine.preemption_counter.preemptions > before


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


@pytest.mark.parametrize("overrides, message", [
    (["dtype=bfloat16"], "float32 only"),
    (["engine.enable_prefix_caching=true"], "engine.enable_prefix_caching=False"),
    (["engine.cpu_attn_split_kv=true"], "engine.cpu_attn_split_kv=False"),
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


def test_the_bitwise_verdict_names_differing_tokens_and_preemptions():
    from parityrl.doctor.rungs import RungResult

    rung = _bitwise_rung()
    settings = {"device": "cpu", "dtype": "float32", "enforce_eager": True,
                "enable_chunked_prefill": False, "enable_prefix_caching": False,
                "async_scheduling": False, "logprobs_mode": "processed_logprobs",
                "cpu_attn_split_kv": False, "single_row_gemm_padded": True,
                "vllm_version": "0.32.0", "head_dtype": "float32",
                "trainer_fp32_lm_head": True, "weights_pushed": True}
    metrics = {"mismatch/max_abs_diff": 2e-7, "engine/preemptions": 3.0}
    result = RungResult(rung.name, rung.layer, SAMPLINGS[0], settings, metrics,
                        abs_diffs=[0.0, 2e-7, 0.0], positions=[0, 1, 2], sync_ok=True)
    verdict = judge([result], {}, "float32")
    assert not verdict.passed
    assert "1 of 3 tokens differ" in verdict.sentence and "preempted 3 requests" in verdict.sentence
    equal = RungResult(rung.name, rung.layer, SAMPLINGS[0], settings,
                       {"mismatch/max_abs_diff": 0.0}, [0.0] * 3, [0, 1, 2], sync_ok=True)
    assert judge([equal], {}, "float32").passed
    broken = RungResult(rung.name, rung.layer, SAMPLINGS[0], settings | {"cpu_attn_split_kv": True},
                        {"mismatch/max_abs_diff": 0.0}, [0.0] * 3, [0, 1, 2], sync_ok=True)
    verdict = judge([broken], {}, "float32")
    assert not verdict.passed and verdict.culprit == "kernels"
    assert "cpu_attn_split_kv=True" in verdict.sentence


@pytest.mark.slow
@pytest.mark.parametrize("variant, lora", [("qwen2", None), ("qwen2", {"rank": 4, "alpha": 16}),
                                           ("qwen3-moe", None)], ids=["full", "lora", "moe"])
def test_a_sync_run_in_bitwise_mode_is_exact_at_every_step(model_factory, tmp_path,
                                                           plugins_importable, variant, lora):
    """Sync mode, top-p, bitwise parity: every token equal, every ratio exactly 1 (sync mode in
    the default parity mode: test_story.py, the reference config). With a LoRA adapter (rank 4
    in the engine's rank-8 slots), from step 2 on a trained, non-zero one. On a mixture of
    experts (vLLM's CPU MoE kernel in the kernel pass), every route the engine's too."""
    tiny_model = model_factory(variant)
    import json

    from helpers import digit_share_config, write_addition_rows

    from parityrl.config import build_config
    from parityrl.pipeline import run_training
    from parityrl.runlog import read_metrics

    prompts = write_addition_rows(tmp_path / "prompts.jsonl")
    cfg = build_config(digit_share_config(tiny_model, prompts, **{
        "mode": "sync", "max_steps": 3, "parity.mode": "bitwise", "sampling.top_p": 0.9,
        "sampling.max_tokens": 96, "engine.max_model_len": 160,
        **({"trainer.lora": lora, "trainer.optim.lr": 1e-2} if lora else {})}))
    run_training(cfg, tmp_path / "run", on_message=lambda m: None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["lag/max"] for r in rows] == [0, 0, 0]
    assert all(r["rl/clip_frac"] == 0 for r in rows)
    assert all(r["mismatch/tokens"] == r["rl/tokens"] > 0 for r in rows)
    assert all(r["mismatch/max_abs_diff"] == 0.0 for r in rows)
    assert all(r["rl/ratio_min"] == r["rl/ratio_max"] == 1.0 for r in rows)
    assert all(r["engine/preemptions"] == 0 for r in rows)
    settings = json.loads((tmp_path / "run" / "engine_settings.json").read_text())
    assert settings["cpu_attn_split_kv"] is False and settings["single_row_gemm_padded"] is True
    if variant == "qwen3-moe":
        assert settings["moe_experts_isa"] in ("amx", "vec")
        assert all(r["mismatch/route_disagreement"] == 0.0 for r in rows)
        assert all(r["mismatch/route_positions"] > 0 for r in rows)
    if lora:
        assert settings["lora"]["max_lora_rank"] == 8
        assert all(r["sync/engines_verified"] == 1.0 for r in rows)
        assert rows[0]["rl/grad_norm"] > 0  # B moves off zero: steps 2 and 3 ran a real adapter
