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


def own_routes(model, rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's own routing of `rollout`'s tokens, float32: expert ids [T, layers, top_k]
    (-1 in dense layers) and each pick's margin (k-th minus (k+1)-th router probability)."""
    from parityrl.trainer.routing import moe_routers

    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    routers = moe_routers(model)
    layers = len(model.get_decoder().layers)
    top_k = routers[0][1].top_k
    picked = torch.full((ids.shape[1], layers, top_k), -1)
    margin = torch.full((ids.shape[1], layers), float("inf"))

    def hook(layer):
        def record(module, args, output):
            logits, _, indices = output
            probs = logits.float().softmax(-1).sort(-1, descending=True).values
            picked[:, layer] = indices
            margin[:, layer] = probs[:, top_k - 1] - probs[:, top_k]
        return record

    handles = [router.register_forward_hook(hook(layer)) for layer, router in routers]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return picked, margin


def agreement(engine_routes, picked, margin, confident: float = 1e-5):
    """(share of confident (position, layer) pairs whose expert sets agree, confident pairs)."""
    engine = torch.from_numpy(engine_routes).long()
    usable = (engine >= 0).all(-1) & (margin > confident)
    same = (engine.sort(-1).values == picked.sort(-1).values).all(-1)
    return float(same[usable].float().mean()), int(usable.sum())


@pytest.mark.slow
def test_the_engines_routes_belong_to_their_request_and_position(moe_model, loop):
    """Many concurrent requests of different lengths (prefill and decode rows of several requests
    in one engine step): each rollout's routes, as the engine's worker attributed them, are the
    trainer's own routing of that rollout on the same float32 weights wherever the router's pick
    is not a rounding tie; routes shifted by a position or taken from another request are not."""
    from helpers import engine_running

    from parityrl.engine.settings import EngineSettings
    from parityrl.models.load import load_policy

    prompts = [[5 + (i * 7 + j) % 60 for j in range(n)] for i, n in
               enumerate((3, 17, 8, 30, 5, 12, 21, 9))]
    with engine_running(loop, EngineSettings(model=moe_model, dtype="float32")) as engine:
        rollouts = loop.run_until_complete(engine.generate_many(
            prompts, SamplingConfig(temperature=1.0, max_tokens=12), n=2, seed=3))
        assert engine.resolved_settings()["routes_captured"] is True
    model = load_policy(moe_model, "float32")
    total = 0
    for rollout in rollouts:
        length = len(rollout.prompt_ids) + len(rollout.completion_ids)
        assert rollout.routes.shape == (length, 2, 2)
        # Every position the engine ran has routes; the last sampled token was never run.
        assert (rollout.routes[:-1] >= 0).all() and (rollout.routes[-1] == -1).all()
        picked, margin = own_routes(model, rollout)
        share, confident = agreement(rollout.routes, picked, margin)
        assert share == 1.0, (share, confident)
        total += confident
        shifted, _ = agreement(rollout.routes[1:], picked[:-1], margin[:-1])
        assert shifted < 0.8, shifted
    assert total > 0.9 * sum(2 * (len(r.prompt_ids) + len(r.completion_ids) - 1) for r in rollouts)
    # Another request's routes (a different prompt, the same length cut) do not pass either.
    a, b = rollouts[0], rollouts[2]
    n = min(len(a.routes), len(b.routes)) - 1
    picked, margin = own_routes(model, a)
    swapped, _ = agreement(b.routes[:n], picked[:n], margin[:n])
    assert swapped < 0.8, swapped


def test_replay_routes_each_position_by_the_engines_experts_and_still_trains_the_router(
        moe_model):
    """`replay` with the trainer's own routes changes nothing; with other experts it changes the
    logprobs, counts every pair as disagreeing, uses the trainer's own routing where a position
    has no route (-1), and the router gets a gradient through the replayed gate weights."""
    import numpy as np

    from parityrl.models.load import load_policy
    from parityrl.rollouts.types import Rollout
    from parityrl.trainer.batch import collate
    from parityrl.trainer.logprobs import token_logprobs
    from parityrl.trainer.routing import moe_routers

    model = load_policy(moe_model, "float32")
    rollout = Rollout(prompt_ids=[5, 6, 7, 8], completion_ids=[9, 10, 11, 12, 13],
                      logprobs=[0.0] * 5, versions=[0] * 5, finish_reason="length")
    picked, _ = own_routes(model, rollout)
    sampling = SamplingConfig(temperature=1.0)

    def score(routes, replay, grad=False):
        rollout.routes = None if routes is None else routes.numpy().astype(np.int16)
        b = collate([rollout], pad_id=0)
        with torch.set_grad_enabled(grad):
            return token_logprobs(model, b.input_ids, b.attention_mask, b.completion_mask,
                                  sampling, routes=b.routes, replay_routes=replay)

    plain = score(None, False)
    same = score(picked, True)
    assert torch.equal(same.logprobs, plain.logprobs)
    assert same.routes.differ.sum() == 0 and same.routes.compared.sum() == 2 * 9
    other = (picked + 1) % 8
    moved = score(other, True)
    assert (moved.logprobs - plain.logprobs)[moved.mask].abs().max() > 1e-3
    assert moved.routes.differ.sum() == moved.routes.compared.sum() == 2 * 9
    # recompute: the same other routes are only compared, never used
    assert torch.equal(score(other, False).logprobs, plain.logprobs)
    uncaptured = torch.full_like(other, -1)
    assert torch.equal(score(uncaptured, True).logprobs, plain.logprobs)
    assert score(uncaptured, True).routes.compared.sum() == 0

    model.zero_grad()
    out = score(other, True, grad=True)
    out.logprobs[out.mask].sum().backward()
    router = moe_routers(model)[0][1]
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
