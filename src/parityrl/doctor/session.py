"""The state one ladder run carries from rung to rung: the trainer's model (perturbed, with its
LoRA adapter), the engine of the current rung's settings, the float64 copy; and how a rung's
tokens are measured on it. ladder.py climbs the rungs, multiturn.py runs its episodes on it.
"""

from __future__ import annotations

import torch

from parityrl.core.mismatch import mismatch_metrics, per_turn_mismatch
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.doctor.rungs import LadderConfig, Rung
from parityrl.engine.settings import EngineSettings
from parityrl.engine.source import start_engine
from parityrl.models.load import load_policy
from parityrl.models.tokenizer import load_tokenizer
from parityrl.tasks.prompts import encode_prompt, has_chat_template
from parityrl.trainer.batch import rollout_logprobs
from parityrl.trainer.engine_kernels import EngineKernels
from parityrl.trainer.float64 import Float64Reference, error_stats
from parityrl.trainer.layout import checkpoint_state_dict
from parityrl.trainer.lora import (adapter_disabled, adapter_state_dict, attach_lora,
                                  lora_settings)
from parityrl.trainer.routing import ROUTING_COMPARED, RouteCounts
from parityrl.weights.lora_folder import engine_max_rank


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


def _wants_fp64(cfg: LadderConfig, model) -> bool:
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


class LadderSession:
    """The state one ladder run carries from rung to rung: model, engine, float64 copy."""

    def __init__(self, cfg: LadderConfig) -> None:
        self.cfg = cfg
        tokenizer = load_tokenizer(cfg.model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.chat_template = (has_chat_template(tokenizer) if cfg.chat_template is None
                              else cfg.chat_template)
        self.prompt_ids = [encode_prompt(tokenizer, p, self.chat_template) for p in cfg.prompts]
        self.model = load_policy(cfg.model, cfg.dtype)
        self.lora = None
        if cfg.lora_rank:
            attach_lora(self.model, cfg.lora_rank, 2.0 * cfg.lora_rank, seed=cfg.seed,
                        init_b_std=cfg.lora_b_std)
            self.lora = lora_settings(self.model)
        self.exact = Float64Reference(self.model) if _wants_fp64(cfg, self.model) else None
        self.engine = None
        self.engine_overrides: dict | None = None
        self.engine_has_trainer_weights = True  # false once the trainer moved and did not push
        self.kernels = None  # the bitwise rung's EngineKernels

    async def engine_for(self, rung: Rung):
        overrides = rung.engine_overrides(self.cfg.seed)
        if self.engine is None or overrides != self.engine_overrides:
            if self.engine is not None:
                await self.engine.close()
            lora = {}
            if self.lora is not None:
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
        stale = "prefix-cache-reset" in self.cfg.withhold
        return await self.engine.update_adapter(
            adapter_state_dict(self.model), self.lora, verify=verify,
            skip=self.cfg.sabotage_skip, reset_prefix_cache=not stale, keep_name=stale)

    def kernels_for(self, rung: Rung):
        """The bitwise rung's trainer side: the engine's kernels on the trainer's weights."""
        if not rung.trainer_kernels:
            return None
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
