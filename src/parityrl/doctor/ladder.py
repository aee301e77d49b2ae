"""The doctor's ladder: measure the engine/trainer mismatch, adding one fix per rung.

    vllm-defaults       what vLLM V1 gives a user who passes nothing (read back from vLLM)
    processed-logprobs  + logprobs of the distribution the sampler sampled from      (semantics)
    explicit-runtime    + prefix caching, chunked prefill, async scheduling off, eager, the
                          neutral generation config, a fixed seed                    (inference path)
    weight-sync         + the trainer perturbs its weights and pushes them in place   (weight sync)
    fp32-lm-head        + lm_head in float32 on both sides                           (numerics)
    routing-replay      (mixture-of-experts models) + the trainer routes each token to the
                          experts the engine chose (trainer.moe_routing=replay)  (routing)
    bitwise             (--bitwise) + the trainer runs the engine's own kernels, the engine
                          the settings they need: every token must be equal     (kernels)

On MoE models every rung also compares the engine's routes with the trainer's own routing
(`mismatch/route_disagreement`); the routing-replay rung scores its tokens twice, with and
without replay (`routing/recompute_*`), and its float64 evaluation replays the engine's routes
too: routing is a discrete choice the two sides then share, and the rule asks about rounding.

Every rung is measured, none is assumed: the engine generates, the trainer recomputes the same
tokens with `token_logprobs` (the function the RL trainer uses), `mismatch_metrics` compares, and
a float64 evaluation of the same weights says how far each side is from exact arithmetic.

A fix can be withheld (`DoctorConfig.withhold`): its engine-side change and its weight push are
left out of its rung and every later one, while the trainer still does what the fix assumes. That
is how one shows what each fix is worth, and how the tests show that each broken layer fails.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from parityrl.engine.settings import BITWISE_KNOBS, EngineSettings
from parityrl.core.mismatch import mismatch_metrics, per_turn_mismatch
from parityrl.models.load import has_experts
from parityrl.trainer.layout import checkpoint_state_dict
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.tasks.prompts import Messages, encode_prompt, has_chat_template
from parityrl.trainer.batch import rollout_logprobs
from parityrl.trainer.float64 import Float64Reference, error_stats
from parityrl.trainer.routing import ROUTING_COMPARED, RouteCounts

DEFAULT_PROMPTS = [
    "12+7=", "What is 3*4? ", "The quick brown fox", "def add(a, b):\n",
    "Once upon a time", "x = [1, 2, 3]\n", "Q: 45-19=? A: ", "Hello, world! ",
]


@dataclass(frozen=True)
class Fix:
    name: str
    layer: str  # which layer of a mismatch it belongs to
    what: str  # in words, for the verdict
    engine: dict = field(default_factory=dict)  # EngineSettings fields it sets
    trainer_fp32_lm_head: bool = False
    pushes_weights: bool = False
    trainer_replays_routes: bool = False


FIXES = [
    Fix("processed-logprobs", "semantics", "logprobs of the processed distribution",
        {"logprobs_mode": "processed_logprobs"}),
    Fix("explicit-runtime", "inference path",
        "prefix caching, chunked prefill and async scheduling off, eager mode, the neutral "
        "generation config, a fixed seed",
        {"enable_prefix_caching": False, "enable_chunked_prefill": False,
         "async_scheduling": False, "enforce_eager": True, "generation_config": "vllm"}),
    Fix("weight-sync", "weight synchronisation",
        "the trainer's weights pushed in place (pause(keep), prefix-cache reset, digests)",
        pushes_weights=True),
    Fix("fp32-lm-head", "numerics", "lm_head in float32 on both sides",
        {"lm_head_dtype": "float32"}, trainer_fp32_lm_head=True),
]
ROUTING = Fix("routing-replay", "routing",
              "the trainer routes each token to the experts the engine chose "
              "(trainer.moe_routing=replay)", trainer_replays_routes=True)
BITWISE = Fix("bitwise", "kernels",
              "the trainer runs the engine's own kernels (parity.mode=bitwise)",
              dict(BITWISE_KNOBS), trainer_fp32_lm_head=True, pushes_weights=True)
FIX_NAMES = tuple(f.name for f in FIXES)
# Besides whole fixes, one part of the weight-sync fix can be withheld on its own.
WITHHOLDABLE = FIX_NAMES + (ROUTING.name, "prefix-cache-reset")
BASELINE = "vllm-defaults"


@dataclass(frozen=True)
class Rung:
    name: str
    layer: str
    fixes: tuple[Fix, ...]  # applied (cumulative), withheld ones removed
    withheld: tuple[str, ...]  # names of fixes up to this rung that were withheld
    trainer_fp32_lm_head: bool
    perturbs: bool  # the trainer moves its weights at this rung (and pushes unless withheld)
    trainer_kernels: bool = False  # the trainer scores with the engine's kernels (bitwise)
    trainer_replays_routes: bool = False  # MoE: the engine's routes replayed (routing-replay)

    def engine_overrides(self, seed: int) -> dict:
        overrides: dict = {}
        for fix in self.fixes:
            overrides |= fix.engine
            if fix.name == "explicit-runtime":
                overrides["seed"] = seed
        return overrides

    @property
    def pushes(self) -> bool:
        return any(f.pushes_weights for f in self.fixes)


def build_ladder(withhold: frozenset[str] = frozenset(), bitwise: bool = False,
                 moe: bool = False) -> list[Rung]:
    """The rungs in order; `moe` adds routing-replay (a mixture-of-experts model)."""
    fixes = FIXES + [ROUTING] if moe else FIXES
    rungs = [Rung(BASELINE, "baseline", (), (), False, False)]
    for i, fix in enumerate(fixes):
        upto = fixes[: i + 1]
        rungs.append(Rung(
            fix.name, fix.layer,
            fixes=tuple(f for f in upto if f.name not in withhold),
            withheld=tuple(f.name for f in upto if f.name in withhold),
            trainer_fp32_lm_head=any(f.trainer_fp32_lm_head for f in upto),
            perturbs=any(f.pushes_weights for f in upto),
            trainer_replays_routes=any(f.trainer_replays_routes and f.name not in withhold
                                       for f in upto),
        ))
    if bitwise:
        last = rungs[-1]
        rungs.append(Rung(BITWISE.name, BITWISE.layer, last.fixes + (BITWISE,), last.withheld,
                          trainer_fp32_lm_head=True, perturbs=True, trainer_kernels=True))
    return rungs


@dataclass
class DoctorConfig:
    model: str
    dtype: str = "float32"
    # Every rung is measured under each of these (sampling is per request: one engine serves all).
    samplings: list[SamplingConfig] = field(
        default_factory=lambda: [SamplingConfig(temperature=0.7, max_tokens=32)])
    prompts: list[str | Messages] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    # Render prompts with the tokenizer's chat template; None = when the tokenizer has one.
    chat_template: bool | None = None
    num_samples: int = 4
    seed: int = 0
    tol: float | None = None  # an absolute bound on the last rung's max |Δ|, instead of the rule
    # Relative size of the weight-sync rung's perturbation; None = 0.02 in float32, 0.1 in lower
    # precision, where a missed update must stand out from the dtype's own rounding.
    perturb_scale: float | None = None
    # Score every rung's tokens in float64 too: how far each side is from exact arithmetic. The
    # verdict rests on it. None = when the model has at most 1e9 parameters (8 bytes a parameter).
    fp64_reference: bool | None = None
    weight_transport: str = "shm_file"  # how pushes reach the engine (EngineSettings)
    withhold: frozenset[str] = frozenset()  # fixes left out (see the module docstring)
    sabotage_skip: frozenset[str] = frozenset()  # tests: leave these tensors out of the push
    max_model_len: int = 512
    # A random non-zero LoRA adapter of this rank on every linear of the decoder (B = 0 would
    # test nothing): the engine holds the adapter, pushed after it starts; the weight-sync rung
    # moves the adapter, not the base. None = no adapter.
    lora_rank: int | None = None
    lora_b_std: float = 0.02  # B ~ N(0, std²); alpha = 2·rank

    @property
    def perturbation(self) -> float:
        if self.perturb_scale is not None:
            return self.perturb_scale
        return 0.02 if self.dtype == "float32" else 0.1

    def __post_init__(self) -> None:
        unknown = set(self.withhold) - set(WITHHOLDABLE)
        if unknown:
            from parityrl.core.errors import UserError

            raise UserError(f"cannot withhold {', '.join(sorted(unknown))}; choose from "
                            f"{', '.join(WITHHOLDABLE)}")


@dataclass
class RungResult:
    name: str
    layer: str
    sampling: SamplingConfig
    settings: dict  # what vLLM resolved, plus the trainer's side
    metrics: dict
    abs_diffs: list[float]  # per token, for the report's plots
    positions: list[int]  # completion position of each token
    withheld: tuple[str, ...] = ()
    sync_check: str | None = None
    sync_ok: bool | None = None
    # |lp − lp_float64| per side over the finite tokens (mean, p99, max); None without float64.
    engine_error: dict | None = None
    trainer_error: dict | None = None
    prefix_reuse_possible: bool = False  # prefix caching on across a weight update, no reset


def perturb_in_place(model, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Move every trainable parameter by `scale` times its own std (deterministic): every weight,
    or a LoRA adapter's alone. Returns the state dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            p.add_(noise * scale * (p.float().std().item() if p.numel() > 1 else 1.0))
    return checkpoint_state_dict(model)


def _routing_of(rung: Rung) -> str:
    """How the trainer routes an MoE model's tokens at `rung`."""
    if rung.trainer_kernels:
        return "engine kernels"  # the kernel pass routes with vLLM's own router
    return "replay" if rung.trainer_replays_routes else "recompute"


def _wants_fp64(cfg: DoctorConfig, model) -> bool:
    if cfg.fp64_reference is not None:
        return cfg.fp64_reference
    return sum(p.numel() for p in model.parameters()) <= 1e9


class Preemptions:
    """Requests the engine preempted from now on (bitwise layouts do not survive one), recorded
    as `engine/preemptions` when the engine counts them."""

    def __init__(self, engine) -> None:
        self.counter = engine.preemption_counter
        self.before = self.counter.preemptions if self.counter else 0

    def record(self, metrics: dict) -> None:
        if self.counter is not None:
            metrics["engine/preemptions"] = float(self.counter.preemptions - self.before)


def noise_floor(model, rollouts: list[Rollout], sampling: SamplingConfig, pad_id: int,
                fp32_lm_head: bool) -> dict:
    """The trainer against itself: the same tokens batched together vs one sequence at a time."""
    together = rollout_logprobs(model, rollouts, sampling, pad_id=pad_id, batch_size=16,
                                fp32_lm_head=fp32_lm_head)
    alone = rollout_logprobs(model, rollouts, sampling, pad_id=pad_id, batch_size=1,
                             fp32_lm_head=fp32_lm_head)
    return mismatch_metrics(torch.cat([r.logprobs for r in together]),
                            torch.cat([r.logprobs for r in alone]))


class LadderSession:
    """The state one ladder run carries from rung to rung: model, engine, float64 copy."""

    def __init__(self, cfg: DoctorConfig) -> None:
        from parityrl.models.load import load_policy
        from parityrl.models.tokenizer import load_tokenizer

        self.cfg = cfg
        tokenizer = load_tokenizer(cfg.model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.chat_template = (has_chat_template(tokenizer) if cfg.chat_template is None
                              else cfg.chat_template)
        self.prompt_ids = [encode_prompt(tokenizer, p, self.chat_template) for p in cfg.prompts]
        self.model = load_policy(cfg.model, cfg.dtype)
        self.lora = None
        if cfg.lora_rank:
            from parityrl.trainer.lora import attach_lora, lora_settings

            attach_lora(self.model, cfg.lora_rank, 2.0 * cfg.lora_rank, seed=cfg.seed,
                        init_b_std=cfg.lora_b_std)
            self.lora = lora_settings(self.model)
        self.exact = Float64Reference(self.model) if _wants_fp64(cfg, self.model) else None
        self.engine = None
        self.engine_overrides: dict | None = None
        self.engine_has_trainer_weights = True  # false once the trainer moved and did not push
        self.kernels = None  # the bitwise rung's EngineKernels

    async def engine_for(self, rung: Rung):
        from parityrl.engine.source import start_engine

        overrides = rung.engine_overrides(self.cfg.seed)
        if self.engine is None or overrides != self.engine_overrides:
            if self.engine is not None:
                await self.engine.close()
            lora = {}
            if self.lora is not None:
                from parityrl.weights.lora_folder import engine_max_rank

                lora = {"max_lora_rank": engine_max_rank(self.lora["rank"])}
            settings = EngineSettings.vllm_defaults(self.cfg.model, dtype=self.cfg.dtype,
                                                    max_model_len=self.cfg.max_model_len,
                                                    weight_transport=self.cfg.weight_transport,
                                                    **lora, **overrides)
            self.engine = await start_engine(settings)
            self.engine_overrides = overrides
            if self.lora is not None:  # the adapter is part of the policy at every rung
                await self.push_adapter(verify=True)
                self.engine_has_trainer_weights = True
            # A fresh engine loads the folder's weights: give it the trainer's if they moved.
            elif rung.pushes and not self.engine_has_trainer_weights:
                await self.engine.update_weights(checkpoint_state_dict(self.model))
                self.engine_has_trainer_weights = True
        return self.engine

    async def move_weights(self, rung: Rung, index: int) -> tuple[str | None, bool | None]:
        """Perturb the trainer's weights; push them unless the push is withheld."""
        cfg, engine = self.cfg, self.engine
        if engine.resolved_settings()["enable_prefix_caching"]:
            # Cache the prompts under the old weights first: without a reset after the update,
            # the engine would reuse their KV blocks.
            warm = cfg.samplings[0].model_copy(update={"max_tokens": 1})
            await engine.generate_many(self.prompt_ids, warm, n=1, seed=cfg.seed)
        state = perturb_in_place(self.model, cfg.perturbation, seed=cfg.seed + index)
        self.engine_has_trainer_weights = False
        if not rung.pushes:
            return None, None
        if self.lora is not None:
            report = await self.push_adapter(verify=False)
        else:
            report = await engine.update_weights(
                state, verify=False, skip=cfg.sabotage_skip,
                reset_prefix_cache="prefix-cache-reset" not in cfg.withhold)
        self.engine_has_trainer_weights = not cfg.sabotage_skip
        return report.check.summary(), report.check.ok

    async def push_adapter(self, verify: bool):
        """The trainer's adapter into the engine. Withholding the prefix-cache reset also keeps
        the adapter's name, as a naive in-place reload does (vLLM keys cached prefixes by it)."""
        from parityrl.trainer.lora import adapter_state_dict

        stale = "prefix-cache-reset" in self.cfg.withhold
        return await self.engine.update_adapter(
            adapter_state_dict(self.model), self.lora, verify=verify,
            skip=self.cfg.sabotage_skip, reset_prefix_cache=not stale, keep_name=stale)

    def kernels_for(self, rung: Rung):
        """The bitwise rung's trainer side: the engine's kernels on the trainer's weights."""
        if not rung.trainer_kernels:
            return None
        from parityrl.trainer.engine_kernels import EngineKernels

        # The doctor measures whatever the engine runs; the verdict names unmet settings.
        self.kernels = EngineKernels.for_engine(self.model, self.engine.resolved_settings(),
                                                self.kernels)
        return self.kernels

    def measure(self, rung: Rung, rollouts: list[Rollout], sampling: SamplingConfig):
        # A compiled engine records no routes (engine/routes.py): nothing to replay then.
        replay = rung.trainer_replays_routes and any(r.routes is not None for r in rollouts)
        recomputed = rollout_logprobs(self.model, rollouts, sampling, pad_id=self.pad_id,
                                      fp32_lm_head=rung.trainer_fp32_lm_head,
                                      kernels=self.kernels_for(rung), replay_routes=replay)
        lp_train = torch.cat([r.logprobs for r in recomputed])
        outside = torch.cat([r.outside_nucleus for r in recomputed])
        lp_engine = torch.tensor([lp for r in rollouts for lp in r.sampled_logprobs],
                                 dtype=torch.float64)
        metrics = mismatch_metrics(lp_train, lp_engine, outside)
        routes = RouteCounts.total([r.routes for r in recomputed if r.routes is not None])
        if routes is not None:
            metrics |= routes.metrics(per_layer=True)
        if replay:  # the same tokens with the trainer's own routing, for comparison
            own = rollout_logprobs(self.model, rollouts, sampling, pad_id=self.pad_id,
                                   fp32_lm_head=rung.trainer_fp32_lm_head)
            recompute = mismatch_metrics(torch.cat([r.logprobs for r in own]), lp_engine)
            metrics |= {f"routing/recompute_{k.split('/', 1)[1]}": recompute[k]
                        for k in ROUTING_COMPARED}
        if self.lora is not None:  # what the adapter does: a zero one would test nothing
            from parityrl.trainer.lora import adapter_disabled

            with adapter_disabled(self.model):
                base = rollout_logprobs(self.model, rollouts, sampling, pad_id=self.pad_id,
                                        fp32_lm_head=rung.trainer_fp32_lm_head)
            effect = (lp_train.double() - torch.cat([r.logprobs for r in base]).double()).abs()
            metrics["lora/adapter_effect_mean_abs"] = float(effect[effect.isfinite()].mean())
        if any(r.turns is not None for r in rollouts):  # episodes: each turn's mismatch too
            turns = torch.tensor([t for r in rollouts for t in r.sampled_turns])
            metrics |= per_turn_mismatch(lp_train, lp_engine, turns)
        diffs = (lp_train.double() - lp_engine).abs()
        engine_error = trainer_error = None
        if self.exact is not None and not rung.trainer_kernels:  # bitwise: equal or not, no rule
            self.exact.refresh(self.model)
            lp_exact = self.exact.logprobs(rollouts, sampling, pad_id=self.pad_id,
                                           fp32_lm_head=rung.trainer_fp32_lm_head,
                                           replay_routes=replay)
            engine_error = error_stats(lp_engine, lp_exact)
            trainer_error = error_stats(lp_train, lp_exact)
        positions = [i for r in rollouts for i in range(r.num_tokens)]
        return metrics, diffs.tolist(), positions, engine_error, trainer_error

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()


async def run_ladder(
    cfg: DoctorConfig, on_rung: Callable[[RungResult], None] | None = None,
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
                from parityrl.doctor.multiturn import check_multi_turn

                # Bitwise: three turns, so that a turn starts after an earlier observation too.
                for check in await check_multi_turn(session, rung,
                                                    turns=3 if rung.trainer_kernels else 2):
                    on_multi_turn(check)
            if on_sampler is not None and index == last_default:
                from parityrl.doctor.sampler import check_sampler

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


def run_ladder_sync(cfg: DoctorConfig, on_rung=None, rungs: list[Rung] | None = None,
                    on_multi_turn=None, on_sampler=None, sampler_draws: int = 2000):
    return asyncio.run(run_ladder(cfg, on_rung, rungs, on_multi_turn, on_sampler,
                                  sampler_draws))
