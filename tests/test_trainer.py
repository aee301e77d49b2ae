"""The trainer and the pieces around it, without the engine: stale filtering, the in-process
stream, micro-batching, the KL and entropy terms, corrections inside a real step, bf16 masters,
compare --ref, samples, plots."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch

from parityrl.config import build_config
from parityrl.models.load import load_policy
from parityrl.pipeline import split_stale
from parityrl.rollouts.stream import InProcessStream
from parityrl.core.rollout import Rollout
from parityrl.trainer.trainer import Trainer


def rollout(version: int = 0, reward: float = 0.0, n: int = 5, seed: int = 0, lp: float = -1.0,
            group: int = 0) -> Rollout:
    gen = torch.Generator().manual_seed(seed)
    completion = torch.randint(4, 90, (n,), generator=gen).tolist()
    r = Rollout([5, 6, 7, 8], completion, [lp] * n, [version] * n, "length", group_id=group)
    r.reward = reward
    r.meta["problem_index"] = group
    return r


def groups(count: int = 4, size: int = 4, lp: float = -1.0) -> list[list[Rollout]]:
    return [[rollout(reward=float(j % 2), seed=10 * g + j, lp=lp, group=g, n=3 + (g + j) % 4)
             for j in range(size)] for g in range(count)]


def test_split_stale_keeps_groups_within_max_lag():
    fresh = [rollout(version=4), rollout(version=3)]
    stale = [rollout(version=4), rollout(version=2)]  # one token two steps old
    kept, dropped = split_stale([fresh, stale], version=4, max_lag=1)
    assert kept == [fresh] and dropped == [stale]
    assert split_stale([stale], version=4, max_lag=2) == ([stale], [])


def test_in_process_stream_hands_over_in_order_and_peeks_without_taking():
    async def scenario():
        stream = InProcessStream()
        a, b, c = [rollout(group=4)], [rollout(group=5)], [rollout(group=6)]
        for g in (a, b, c):
            await stream.put(g)
        assert stream.peek() == [a, b, c]
        assert await stream.get(2) == [a, b]
        assert stream.peek() == [c]
        waiter = asyncio.create_task(stream.get(2))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # waits for a second group
        d = [rollout(group=7)]
        await stream.put(d)
        assert await waiter == [c, d] and stream.peek() == []

    asyncio.run(scenario())


def test_a_stream_at_its_drop_cap_hands_over_the_groups_with_signal_it_has():
    """Dynamic sampling, train_fewer: after 2 dropped groups a step takes the one group it has
    instead of waiting for 3; with none it waits for the first; the count starts again."""
    from parityrl.rollouts.dynamic_sampling import DynamicSamplingConfig, has_signal

    assert DynamicSamplingConfig(enabled=True, max_draws=1.5).stop_waiting_after(4) == 2
    assert DynamicSamplingConfig(enabled=True, at_cap="wait").stop_waiting_after(4) is None
    assert not has_signal([rollout(reward=1.0), rollout(reward=1.0)])
    assert has_signal([rollout(reward=1.0), rollout(reward=0.5)])

    async def scenario():
        stream = InProcessStream(stop_waiting_after=2)
        a, b = [rollout(group=4)], [rollout(group=5)]
        await stream.put(a)
        waiter = asyncio.create_task(stream.get(3))
        stream.drop()
        await asyncio.sleep(0.01)
        assert not waiter.done()  # one drop: still waiting for a full step
        stream.drop()
        assert await waiter == [a] and stream.dropped == 0
        stream.drop(), stream.drop()
        waiter = asyncio.create_task(stream.get(3))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # at the cap with nothing to train on: waits for a group
        await stream.put(b)
        assert await waiter == [b]

    asyncio.run(scenario())


def make_trainer(model_dir: str, **overrides) -> Trainer:
    cfg = {"model": model_dir, "sampling": {"temperature": 1.0}, **overrides}
    config = build_config(cfg)
    ref = load_policy(model_dir) if config.trainer.loss.kl_coef > 0 else None
    return Trainer(config, load_policy(model_dir), pad_id=0, ref_model=ref)


def grads(trainer: Trainer, batch) -> dict[str, torch.Tensor]:
    trainer.accumulate(batch)
    out = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return out


def test_the_gradient_does_not_depend_on_the_microbatch_split(tiny_model):
    batch = groups()
    whole = grads(make_trainer(tiny_model), batch)
    small = make_trainer(tiny_model, trainer={"optim": {"tokens_per_microbatch": 20}})
    from parityrl.trainer.trainer import microbatches

    rollouts = [r for g in batch for r in g]
    assert len(microbatches(rollouts, 20)) > 4  # really split
    split = grads(small, batch)
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7)


def test_groups_with_zero_advantage_skip_the_backward_and_leave_the_gradient_as_it_was(
        tiny_model):
    batch = groups()
    for r in batch[1] + batch[3]:  # all equal: advantage exactly 0
        r.reward = 1.0
    every = make_trainer(tiny_model, trainer={"skip_zero_advantage": False,
                                              "sort_by_length": False})
    whole = grads(every, batch)
    lean = make_trainer(tiny_model, trainer={"skip_zero_advantage": True})
    skipped = grads(lean, batch)
    assert whole.keys() == skipped.keys()
    for name in whole:
        torch.testing.assert_close(skipped[name], whole[name], rtol=1e-4, atol=1e-7)
    metrics = lean.apply(lean.accumulate(batch))
    sampled = sum(r.num_tokens for g in batch for r in g)
    mixed = sum(r.num_tokens for g in (batch[0], batch[2]) for r in g)
    assert metrics["rl/tokens_sampled"] == sampled and metrics["rl/tokens"] == mixed
    assert metrics["rl/zero_advantage_frac"] == 0.5
    assert metrics["mismatch/coverage"] == pytest.approx(mixed / sampled)
    # A KL term has a gradient of its own at advantage 0: nothing is skipped then.
    kl = make_trainer(tiny_model, trainer={"skip_zero_advantage": True,
                                           "loss": {"kl_coef": 0.1}})
    assert kl.apply(kl.accumulate(batch))["rl/tokens"] == sampled


def test_kl_and_entropy_terms_change_the_gradient_and_are_reported(tiny_model):
    batch = groups()
    plain = grads(make_trainer(tiny_model), batch)
    # The policy equals the reference at the start: the k3 KL and its gradient are zero there.
    kl = make_trainer(tiny_model, trainer={"loss": {"kl_coef": 0.5}})
    metrics = kl.apply(kl.accumulate(batch))
    assert metrics["kl/ref_k3"] == pytest.approx(0.0, abs=1e-9)
    metrics = kl.apply(kl.accumulate(batch))  # one step later the policy moved away
    assert metrics["kl/ref_k3"] > 0
    name = "model.layers.0.mlp.down_proj.weight"
    # Against a reference that differs from the policy, the KL term has a gradient of its own.
    from parityrl.doctor.session import perturb_in_place

    away = make_trainer(tiny_model, trainer={"loss": {"kl_coef": 0.5}})
    perturb_in_place(away.ref_model, 0.05, seed=1)
    assert not torch.allclose(grads(away, batch)[name], plain[name])
    entropy = grads(make_trainer(tiny_model, trainer={"loss": {"entropy_coef": 0.1}}), batch)
    assert not torch.allclose(entropy[name], plain[name])


@pytest.mark.parametrize("kind", ["tis", "mis", "icepop"])
def test_corrections_act_inside_a_real_step(tiny_model, kind):
    # Engine logprobs far below the trainer's: behaviour→trainer ratios w well above 1.
    batch = groups(lp=-8.0)
    trainer = make_trainer(tiny_model, trainer={"correction": {"type": kind, "cap": 2.0}})
    metrics = trainer.apply(trainer.accumulate(batch))
    if kind == "tis":  # weights truncated at the cap
        assert metrics["is/weight_max"] == 2.0
        assert metrics["is/truncated_frac"] > 0.5 and metrics["is/masked_frac"] == 0.0
    else:  # tokens (or sequences) with w outside the bounds dropped
        assert metrics["is/weight_max"] > 2.0 and metrics["is/masked_frac"] > 0.5
    # Without a correction the ratio is taken against the engine's logprobs: every token with a
    # positive advantage (half of them) clips.
    plain = make_trainer(tiny_model)
    assert plain.apply(plain.accumulate(batch))["rl/clip_frac"] == pytest.approx(0.5)


def test_compare_with_an_extra_reference_seed_widens_the_band(tmp_path):
    from test_compare import METRICS, make_run

    from parityrl.compare import compare_runs

    ref = make_run(tmp_path / "ref", 60, seed=1)
    cand = make_run(tmp_path / "cand", 60, seed=3, shift_at=30, shift=0.15)
    alone = compare_runs(ref, [cand], metrics=["rl/reward_mean"])
    # A second reference seed that itself sits 0.3 away: the noise between seeds is that large.
    seed2 = make_run(tmp_path / "seed2", 60, seed=2, shift_at=1, shift=0.3)
    widened = compare_runs(ref, [cand], [seed2], metrics=["rl/reward_mean"])
    assert alone.diverged and not widened.diverged
    assert max(widened.results[0].band) > max(alone.results[0].band)
    assert METRICS


def test_samples_are_logged_and_a_reward_stuck_at_zero_is_announced_once(tmp_path, tiny_model):
    from parityrl.models.tokenizer import load_tokenizer
    from parityrl.pipeline import SampleLog
    from parityrl.runlog import JsonlLog, MetricsWriter, read_metrics

    cfg = build_config({"model": tiny_model, "samples_every": 2, "samples_per_log": 3})
    messages: list[str] = []
    samples_log = JsonlLog(tmp_path / "samples.jsonl")
    writer = MetricsWriter(tmp_path, tensorboard=True)
    log_samples = SampleLog(cfg, load_tokenizer(tiny_model), samples_log, writer, messages.append)
    batch = groups()
    for r in (r for g in batch for r in g):
        r.meta.update(prompt="12+7=", answer="19")
        r.reward = 0.0
    for step in range(1, 6):
        log_samples(step, batch, {"rl/reward_mean": 0.0})
    samples_log.close()
    writer.close()
    rows = read_metrics(tmp_path / "samples.jsonl")
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    assert {"prompt", "completion", "reward", "answer", "versions"} <= set(rows[0])
    assert len({r["problem_index"] for r in rows if r["step"] == 1}) == 3  # one per group first
    warnings = [m for m in messages if "reward has been 0" in m]
    assert len(warnings) == 1 and "'12+7='" in warnings[0] and "samples.jsonl" in warnings[0]
    assert list((tmp_path / "tb").iterdir())  # the samples also went to TensorBoard's text tab
    # With learned rewards the warning names the sources and the judge's answer.
    for r in (r for g in batch for r in g):
        r.meta.update(verified_reward=1.0, learned_rewards={"judge": 0.0}, judge_answer="No")
    judged = SampleLog(cfg, load_tokenizer(tiny_model), JsonlLog(tmp_path / "s2.jsonl"),
                       MetricsWriter(tmp_path, tensorboard=False), messages.append)
    for step in range(1, 6):
        judged(step, batch, {"rl/reward_mean": 0.0})
    (warning,) = [m for m in messages if "reward has been 0" in m][1:]
    assert "judge 0" in warning and "verified reward 1" in warning
    assert "the judge answered 'No'" in warning


def test_bfloat16_training_accumulates_updates_in_float32_masters(tiny_model):
    """An AdamW step of lr 1e-5 is far below a bfloat16 weight's resolution: without float32
    masters the model would not move at all; with them the masters move every step and the
    model holds them rounded to bfloat16."""
    config = build_config({"model": tiny_model, "dtype": "bfloat16", "sampling": {"temperature": 1.0},
                           "trainer": {"optim": {"lr": 1e-5}}})
    model = load_policy(tiny_model, "bfloat16")
    trainer = Trainer(config, model, pad_id=0)
    name = "model.layers.0.mlp.down_proj.weight"
    index = [n for n, _ in model.named_parameters()].index(name)
    start = trainer.master[index].detach().clone()
    for _ in range(3):
        trainer.apply(trainer.accumulate(groups()))
    moved = trainer.master[index].detach()
    assert moved.dtype == torch.float32 and 0 < (moved - start).abs().max() < 1e-4
    param = dict(model.named_parameters())[name]
    assert param.dtype == torch.bfloat16 and torch.equal(param.detach(), moved.to(torch.bfloat16))
    saved = trainer.master_state()
    assert saved is not None and torch.equal(saved[name], moved)


def test_log_panels_say_when_they_raise_zeros_to_the_floor(tmp_path):
    from parityrl.plots import LOG_FLOOR, floor_for_log, plot_run

    title = "mismatch KL k3"
    assert floor_for_log([(1, 1e-3), (2, 2e-5)], title) == ([(1, 1e-3), (2, 2e-5)], title)
    points, floored = floor_for_log([(1, 0.0), (2, 1e-3)], title)
    assert points == [(1, LOG_FLOOR), (2, 1e-3)]
    assert floored == f"{title} (values < 1e-12 drawn at 1e-12)"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        f'{{"step": {s}, "mismatch/kl_k3": 0.0, "rl/reward_mean": 0.5}}\n' for s in (1, 2)))
    (png,) = plot_run(run)
    assert png.stat().st_size > 10_000


def test_pass_at_k_curves_are_drawn_beside_the_greedy_accuracy_in_order_of_k(tmp_path):
    from parityrl.plots import pass_at_k_series, plot_run

    rows = [{"step": 0, "eval/accuracy": 0.3, "eval/pass@1": 0.1, "eval/pass@16": 0.5,
             "eval/pass@4": 0.3}, {"step": 1, "rl/reward_mean": 0.2},
            {"step": 2, "eval/accuracy": 0.4, "eval/pass@1": 0.2, "eval/pass@16": 0.6,
             "eval/pass@4": 0.4}]
    series = pass_at_k_series(rows)
    assert list(series) == ["pass@1", "pass@4", "pass@16"]
    assert series["pass@4"] == [(0, 0.3), (2, 0.4)]
    assert pass_at_k_series(rows[1:2]) == {}
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (png,) = plot_run(run)
    assert png.stat().st_size > 10_000


def test_float16_loss_scaling_skips_and_counts_overflows_and_resumes_its_scale(tiny_model,
                                                                              tmp_path):
    """float16: the scale auto-resolves to dynamic; a scale that overflows the float16 backward
    is a skipped step (weights untouched, counted, scale halved, not a fault); a safe scale gives
    a real step; the scale and its counters come back from a checkpoint."""
    def trainer_with(init: float) -> Trainer:
        config = build_config({"model": tiny_model, "dtype": "float16",
                               "sampling": {"temperature": 1.0},
                               "trainer": {"optim": {"loss_scale": {"init": init}}}})
        assert config.trainer.optim.loss_scale.mode == "dynamic"
        return Trainer(config, load_policy(tiny_model, "float16"), pad_id=0)

    assert build_config({"model": tiny_model}).trainer.optim.loss_scale.mode == "off"
    huge = trainer_with(2.0 ** 100)
    before = {n: p.detach().clone() for n, p in huge.model.named_parameters()}
    m = huge.apply(huge.accumulate(groups()))
    assert m["rl/skipped_nonfinite_step"] == 1.0 and m["rl/overflow_steps"] == 1.0
    assert m["rl/loss_scale"] == 2.0 ** 100 and huge.loss_scale.scale == 2.0 ** 99
    assert huge.nonfinite_streak == 0  # an overflow above the floor is not a fault
    assert all(torch.equal(p.detach(), before[n]) for n, p in huge.model.named_parameters())

    safe = trainer_with(2.0 ** 8)
    before = {n: p.detach().clone() for n, p in safe.model.named_parameters()}
    m = safe.apply(safe.accumulate(groups()))
    assert m["rl/skipped_nonfinite_step"] == 0.0 and m["rl/overflow_steps"] == 0.0
    assert math.isfinite(m["rl/grad_norm"]) and m["rl/loss_scale"] == 2.0 ** 8
    assert any(not torch.equal(p.detach(), before[n]) for n, p in safe.model.named_parameters())
    unscaled = Trainer(build_config({"model": tiny_model, "dtype": "float16",
                                     "sampling": {"temperature": 1.0},
                                     "trainer": {"optim": {"loss_scale": {"mode": "off"}}}}),
                       load_policy(tiny_model, "float16"), pad_id=0)
    reference = unscaled.apply(unscaled.accumulate(groups()))["rl/grad_norm"]
    assert m["rl/grad_norm"] == pytest.approx(reference, rel=2e-2)  # unscaled before the norm
    safe.loss_scale.load({"scale": 512.0, "clean_steps": 3, "overflow_steps": 2})
    safe.save_checkpoint(tmp_path, step=1, data_position=0, keep=1)
    resumed = trainer_with(2.0 ** 8)
    resumed.restore(tmp_path / "checkpoints" / "step-000001")
    assert resumed.loss_scale.state() == {"scale": 512.0, "clean_steps": 3, "overflow_steps": 2}


def test_overlong_masking_leaves_cut_completions_out_and_shaping_gives_equal_rewards_signal(
        tiny_model):
    """mask: the completions cut at max_tokens (finish_reason "length") go through no forward
    or backward and count in no denominator. shape: a group whose rewards are all equal gets
    advantages from the length penalty (the longest completion the lowest)."""
    batch = groups()
    for g in batch:
        for j, r in enumerate(g):
            r.finish_reason = "stop" if j < 2 else "length"
    masked = make_trainer(tiny_model, trainer={"overlong": {"mode": "mask"}})
    state = masked.accumulate(batch)
    kept = [r for g in batch for r in g[:2]]
    assert sorted(map(id, state.learned)) == sorted(map(id, kept))
    metrics = masked.apply(state)
    assert metrics["rl/truncated_frac"] == 0.5
    assert metrics["rl/tokens"] == sum(r.num_tokens for r in kept)

    same = [[rollout(reward=1.0, n=n, seed=n) for n in (2, 5, 8)]]
    shaped = make_trainer(tiny_model, sampling={"temperature": 1.0, "max_tokens": 8},
                          trainer={"overlong": {"mode": "shape", "window": 4}})
    metrics = shaped.apply(shaped.accumulate(same))
    penalties = [r.meta["overlong_penalty"] for r in same[0]]
    assert penalties == [0.0, -0.25, -1.0]
    advantages = [r.advantage for r in same[0]]
    assert advantages[0] > advantages[1] > advantages[2]
    assert metrics["rl/overlong_penalty_mean"] == pytest.approx(-1.25 / 3)
