"""The doctor's ladder: measure the engine/trainer mismatch, adding one fix per rung (the rungs
and their fixes: rungs.py).

On MoE models every rung also compares the engine's routes with the trainer's own routing
(`mismatch/route_disagreement`); the routing-replay rung scores its tokens twice, with and
without replay (`routing/recompute_*`), and its float64 evaluation replays the engine's routes
too: routing is a discrete choice the two sides then share, and the rule asks about rounding.

Every rung is measured, none is assumed: the engine generates, the trainer recomputes the same
tokens with `token_logprobs` (the function the RL trainer uses), `mismatch_metrics` compares, and
a float64 evaluation of the same weights says how far each side is from exact arithmetic.

A fix can be withheld (`LadderConfig.withhold`): its engine-side change and its weight push are
left out of its rung and every later one, while the trainer still does what the fix assumes. That
is how one shows what each fix is worth, and how the tests show that each broken layer fails.
"""

from __future__ import annotations

import asyncio
import math
from typing import Callable

import torch

from parityrl.core.mismatch import mismatch_metrics
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.doctor.multiturn import check_multi_turn
from parityrl.doctor.rungs import LadderConfig, Rung, RungResult, build_ladder
from parityrl.doctor.sampler import check_sampler
from parityrl.doctor.session import LadderSession, Preemptions
from parityrl.models.load import has_experts
from parityrl.trainer.batch import rollout_logprobs


def _routing_of(rung: Rung) -> str:
    """How the trainer routes an MoE model's tokens at `rung`."""
    if rung.trainer_kernels:
        return "engine kernels"  # the kernel pass routes with vLLM's own router
    return "replay" if rung.trainer_replays_routes else "recompute"


def noise_floor(model, rollouts: list[Rollout], sampling: SamplingConfig, pad_id: int,
                fp32_lm_head: bool) -> dict:
    """The trainer against itself: the same tokens batched together vs one sequence at a time."""
    together = rollout_logprobs(model, rollouts, sampling, pad_id=pad_id, batch_size=16,
                                fp32_lm_head=fp32_lm_head)
    alone = rollout_logprobs(model, rollouts, sampling, pad_id=pad_id, batch_size=1,
                             fp32_lm_head=fp32_lm_head)
    return mismatch_metrics(torch.cat([r.logprobs for r in together]),
                            torch.cat([r.logprobs for r in alone]))


async def run_ladder(
    cfg: LadderConfig, on_rung: Callable[[RungResult], None] | None = None,
    rungs: list[Rung] | None = None, on_multi_turn: Callable | None = None,
    on_sampler: Callable | None = None, sampler_draws: int = 2000,
) -> tuple[list[RungResult], dict]:
    """Run the ladder in order; returns one result per rung and sampling, and the trainer's noise
    floor (measured on the first rung's rollouts of the first sampling). With `on_multi_turn`,
    the multi-turn check (doctor/multiturn.py) runs on the engine of the last rung before the
    bitwise one, after that rung (and with three turns after the bitwise rung, judged equal or
    not), and each of its results is handed to it; with `on_sampler`,
    the sampler check (doctor/sampler.py, `sampler_draws` draws a prompt) there too, once per
    sampling."""
    rungs = rungs if rungs is not None else build_ladder(cfg.withhold,
                                                         moe=has_experts(cfg.model))
    session = LadderSession(cfg)
    results: list[RungResult] = []
    floor: dict = {}
    # The multi-turn and sampler checks run on the engine of the last rung that scores with the
    # trainer's own forward.
    last_default = max(i for i, r in enumerate(rungs) if not r.trainer_kernels) if any(
        not r.trainer_kernels for r in rungs) else None
    try:
        for index, rung in enumerate(rungs):
            engine = await session.engine_for(rung)
            sync_check = sync_ok = None
            if rung.perturbs:
                sync_check, sync_ok = await session.move_weights(rung, index)
            resolved = engine.resolved_settings() | {
                "trainer_fp32_lm_head": rung.trainer_fp32_lm_head, "trainer_dtype": cfg.dtype,
                "chat_template": session.chat_template, "trainer_lora": session.lora,
                "weights_pushed": rung.pushes if rung.perturbs else None,
                "prefix_cache_reset_after_update":
                    ("prefix-cache-reset" not in cfg.withhold) if rung.perturbs else None}
            resolved["trainer_moe_routing"] = (_routing_of(rung) if resolved.get("routes_captured")
                                               else None)
            for sampling in cfg.samplings:
                preemptions = Preemptions(engine)
                rollouts = await engine.generate_many(session.prompt_ids, sampling,
                                                      n=cfg.num_samples, seed=cfg.seed)
                metrics, diffs, positions, e_err, t_err = session.measure(rung, rollouts, sampling)
                preemptions.record(metrics)
                result = RungResult(
                    rung.name, rung.layer, sampling, resolved, metrics, diffs, positions,
                    rung.withheld, sync_check, sync_ok, e_err, t_err,
                    prefix_reuse_possible=bool(rung.perturbs and resolved["enable_prefix_caching"]
                                               and "prefix-cache-reset" in cfg.withhold))
                results.append(result)
                if on_rung:
                    on_rung(result)
                if not floor:
                    floor = noise_floor(session.model, rollouts, sampling, session.pad_id,
                                        rungs[-1].trainer_fp32_lm_head)
            if on_multi_turn is not None and (index == last_default or rung.trainer_kernels):
                # Bitwise: three turns, so that a turn starts after an earlier observation too.
                for check in await check_multi_turn(session, rung,
                                                    turns=3 if rung.trainer_kernels else 2):
                    on_multi_turn(check)
            if on_sampler is not None and index == last_default:
                for sampling in cfg.samplings:
                    # The mismatch this rung measured bounds how far the trainer's distribution
                    # may be from the one the engine reports (the sampler check's band).
                    measured = [r.metrics["mismatch/max_abs_diff"] for r in results
                                if r.name == rung.name and r.sampling == sampling]
                    band = measured[-1] if measured and math.isfinite(measured[-1]) else 0.0
                    on_sampler(await check_sampler(
                        engine, session.model, session.prompt_ids, sampling, sampler_draws,
                        cfg.seed, fp32_lm_head=rung.trainer_fp32_lm_head, band=band))
    finally:
        await session.close()
    return results, floor


def run_ladder_sync(cfg: LadderConfig, on_rung=None, rungs: list[Rung] | None = None,
                    on_multi_turn=None, on_sampler=None, sampler_draws: int = 2000):
    return asyncio.run(run_ladder(cfg, on_rung, rungs, on_multi_turn, on_sampler,
                                  sampler_draws))
