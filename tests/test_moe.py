"""Mixture-of-experts models (issue 28, first part): a tiny Qwen3-MoE built locally, its weights
pushed under the checkpoint's names, a float64 reference that runs its experts, and the doctor's
last rung passing on the real vLLM CPU engine after an in-place push (which needed the CPU
experts' prepack re-run: engine/worker_extension.py `_repack_cpu_experts`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parityrl.core.sampling import SamplingConfig


@pytest.fixture(scope="module")
def moe_model(model_factory) -> str:
    return model_factory("qwen3-moe")


def test_a_tiny_moe_pushes_its_experts_under_the_checkpoints_names_and_scores_in_float64(
        moe_model):
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from parityrl.models.load import load_policy
    from parityrl.trainer.layout import checkpoint_state_dict
    from parityrl.trainer.logprobs import token_logprobs
    from parityrl.trainer.float64 import Float64Reference

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
@pytest.mark.parametrize("variant", ["qwen3-moe", "qwen2-moe"])
def test_the_doctor_passes_a_tiny_moe_after_a_push_and_names_a_withheld_router_weight(
        model_factory, variant):
    """The last rung on an MoE model (routing-replay: weights pushed in place, fp32 heads, the
    engine's routes replayed) passes by the dense models' rule, and compares the routes; the
    same push without one router weight fails at the weight-synchronisation layer. Qwen3-MoE
    renormalises its picked experts' weights; Qwen2-MoE does not, and adds a gated shared
    expert."""
    from parityrl.doctor.ladder import run_ladder_sync
    from parityrl.doctor.rungs import LadderConfig, build_ladder
    from parityrl.doctor.verdict import judge

    moe_model = model_factory(variant)

    rungs = build_ladder(moe=True)[-1:]
    assert rungs[0].name == "routing-replay" and rungs[0].trainer_replays_routes
    cfg = LadderConfig(model=moe_model, num_samples=3, prompts=["12+7=", "abc", "x = [1, 2"],
                       samplings=[SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=24)])
    results, floor = run_ladder_sync(cfg, rungs=rungs)
    (last,) = results
    assert last.sync_ok is True and last.metrics["mismatch/tokens"] > 0
    verdict = judge(results, floor, "float32")
    assert verdict.passed, verdict.text
    assert last.metrics["mismatch/max_abs_diff"] < 1e-4
    assert last.settings["trainer_moe_routing"] == "replay"
    # float32: the two routers agree wherever the pick is not a rounding tie
    assert last.metrics["mismatch/route_disagreement"] < 0.01
    assert last.metrics["routing/recompute_max_abs_diff"] < 1e-4
    assert "On the same tokens of 'routing-replay'" in verdict.text

    router = "model.layers.1.mlp.gate.weight"
    cfg.sabotage_skip = frozenset({router})
    results, floor = run_ladder_sync(cfg, rungs=rungs)
    verdict = judge(results, floor, "float32")
    assert not verdict.passed and verdict.culprit == "weight synchronisation", verdict.text
    assert router in results[0].sync_check


def test_the_verdict_names_routing_when_routes_differ_and_the_trainer_recomputes():
    """An inconsistent MoE rung where the trainer routed by its own router and routes differed
    is a routing failure, with the config key that replays them; replaying, the advice would be
    wrong and is not given (the ladder rule then names the first inconsistent rung)."""
    from parityrl.doctor.rungs import RungResult
    from parityrl.doctor.verdict import judge

    def rung(routing):
        settings = {"logprobs_mode": "processed_logprobs", "head_dtype": "float32",
                    "trainer_fp32_lm_head": True, "trainer_dtype": "float32",
                    "trainer_moe_routing": routing}
        metrics = {"mismatch/mean_abs_diff": 0.02, "mismatch/max_abs_diff": 1.1,
                   "mismatch/mean_diff": 0.0, "mismatch/clip_frac@0.2": 0.01,
                   "mismatch/route_disagreement": 0.012}
        err = {"mean": 1e-3, "p99": 1e-2, "max": 0.5}
        return RungResult("routing-replay", "routing", SamplingConfig(), settings, metrics, [],
                          [], engine_error={k: 20 * v for k, v in err.items()},
                          trainer_error=err)

    recomputed = judge([rung("recompute")], {}, "float32")
    assert not recomputed.passed and recomputed.culprit == "routing"
    assert "1.20% of (position, layer) routes differ" in recomputed.sentence
    assert "trainer.moe_routing: replay" in recomputed.sentence
    replayed = judge([rung("replay")], {}, "float32")
    assert not replayed.passed and "moe_routing" not in replayed.sentence
    assert "routes differ" not in replayed.sentence


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
    from parityrl.core.rollout import Rollout
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


def test_a_trainer_step_on_moe_replays_reports_route_disagreement_and_checkpoints_per_expert(
        moe_model, tmp_path):
    """One optimizer step with the engine's routes (here: the trainer's own, one layer's picks
    moved at one position): replay and the route metrics on the trainer's path; the checkpoint
    holds the model folder's per-expert layout (what the engine and `export` read) and restores
    into transformers' fused in-memory layout exactly."""
    import json

    from safetensors.torch import load_file

    from parityrl.config import build_config
    from parityrl.export import export_checkpoint
    from parityrl.models.load import load_policy
    from parityrl.core.rollout import Rollout
    from parityrl.trainer.trainer import Trainer

    def trainer(**trainer_cfg):
        cfg = build_config({"model": moe_model, "sampling": {"temperature": 1.0},
                            "mode": "sync", "trainer": trainer_cfg,
                            "parity": {"routes_per_layer": True, "compare_routing": True}})
        return Trainer(cfg, load_policy(moe_model), pad_id=0)

    replaying = trainer(moe_routing="replay")
    groups = []
    for g in range(2):
        group = []
        for j in range(2):
            r = Rollout([5, 6, 7, 8 + g], [9 + j, 10, 11], [-1.0] * 3, [0] * 3, "length",
                        group_id=g, reward=float(j))
            picked, _ = own_routes(replaying.model, r)
            routes = picked.numpy().astype("int16")
            routes[-1] = -1
            if g == 0 and j == 0:
                routes[2, 1] = (routes[2, 1] + 1) % 8  # one (position, layer) the engine chose
            r.routes = routes
            group.append(r)
        groups.append(group)
    state = replaying.accumulate(groups)
    replaying.score_exact(state)  # with compare_routing: the same tokens, own routing
    metrics = replaying.apply(state)
    pairs = 2 * sum(len(r.prompt_ids) + len(r.completion_ids) - 1 for g in groups for r in g)
    assert metrics["mismatch/route_disagreement"] == pytest.approx(1 / pairs)
    assert metrics["mismatch/route_disagreement/layer1"] == pytest.approx(2 / pairs)
    assert metrics["mismatch/route_disagreement/layer0"] == 0.0
    assert "routing/recompute_mean_abs_diff" in metrics and metrics["rl/grad_norm"] > 0

    replaying.save_checkpoint(tmp_path, step=1, data_position=4, keep=1)
    folder = tmp_path / "checkpoints" / "step-000001"
    on_disk = load_file(str(Path(moe_model) / "model.safetensors"))
    assert set(load_file(str(folder / "model.safetensors"))) == set(on_disk)
    resumed = trainer(moe_routing="replay")
    resumed.restore(folder)
    mine = replaying.model.state_dict()
    assert all(torch.equal(t, mine[n]) for n, t in resumed.model.state_dict().items())
    (tmp_path / "config.yaml").write_text(json.dumps({"model": moe_model}))
    exported = export_checkpoint(tmp_path, tmp_path / "exported")
    reloaded = load_policy(str(exported)).state_dict()
    assert all(torch.equal(t, mine[n]) for n, t in reloaded.items())


# A minimal chat template for the character tokenizer (the tiny models have none).
CHAT = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}")


@pytest.mark.slow
def test_an_episodes_routes_cover_every_turn_and_observation_on_the_engines_request(
        moe_model, loop):
    """A three-turn episode: each turn is an engine request of its own; the episode's routes
    hold, for every position but the last, the routes of a request that ran it (a turn's
    sampled tokens from its own request, an observation from the next turn's prefill), and in
    float32 they are the trainer's own routing of the whole episode."""
    from helpers import engine_running

    from parityrl.engine.settings import EngineSettings
    from parityrl.models.load import load_policy
    from parityrl.models.tokenizer import load_tokenizer
    from parityrl.rollouts.episode import EpisodeLimits, engine_turns, run_episode
    from parityrl.tasks.environment import EnvReply

    tokenizer = load_tokenizer(moe_model)
    tokenizer.chat_template = CHAT

    async def respond(messages, last_turn):
        if last_turn:
            return EnvReply(reward=1.0)
        return EnvReply(message={"role": "user", "content": f"obs{len(messages)}"})

    with engine_running(loop, EngineSettings(model=moe_model, dtype="float32")) as engine:
        episode = loop.run_until_complete(run_episode(
            engine_turns(engine), respond, tokenizer, [{"role": "user", "content": "12+7="}],
            SamplingConfig(temperature=1.0, max_tokens=8), EpisodeLimits(3, 256), seed=5))
    assert episode.num_turns == 3 and not all(episode.sampled_mask)
    length = len(episode.prompt_ids) + len(episode.completion_ids)
    assert episode.routes.shape == (length, 2, 2)
    assert (episode.routes[:-1] >= 0).all() and (episode.routes[-1] == -1).all()
    picked, margin = own_routes(load_policy(moe_model, "float32"), episode)
    share, confident = agreement(episode.routes, picked, margin)
    assert share == 1.0 and confident > 0.9 * 2 * (length - 1), (share, confident)
