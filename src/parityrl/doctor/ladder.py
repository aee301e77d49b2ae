"""The doctor's ladder: measure the engine/trainer mismatch, adding one fix per rung.

    engine-defaults     vLLM's own defaults (raw logprobs, prefix caching, model-dtype lm_head)
    processed-logprobs  + logprobs of the distribution the sampler actually sampled from  (semantics)
    explicit-runtime    + prefix caching off, async scheduling off, eager, fixed seed  (inference path)
    weight-sync         + trainer perturbs its weights and pushes them in place  (inference path)
    fp32-lm-head        + lm_head in float32 on both sides  (numerics)

Every rung is measured, none is assumed: the engine generates, the trainer recomputes the same
tokens with `token_logprobs` (the function the RL trainer uses), and `mismatch_metrics` compares.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import torch

from parityrl.engine.settings import EngineSettings
from parityrl.mismatch import mismatch_metrics
from parityrl.rollouts.types import Rollout
from parityrl.sampling import SamplingConfig
from parityrl.trainer.batch import rollout_logprobs
from parityrl.trainer.precision import exact_logprobs

DEFAULT_TOL = {"float32": 1e-5, "bfloat16": 0.1, "float16": 0.05}

DEFAULT_PROMPTS = [
    "12+7=", "What is 3*4? ", "The quick brown fox", "def add(a, b):\n",
    "Once upon a time", "x = [1, 2, 3]\n", "Q: 45-19=? A: ", "Hello, world! ",
]


@dataclass(frozen=True)
class Rung:
    name: str
    layer: str  # which layer of a mismatch this rung's fix belongs to
    fix: str  # the fix in words, for the verdict
    engine: dict  # EngineSettings overrides relative to vLLM's defaults
    fp32_lm_head: bool = False  # trainer side
    push_weights: bool = False


LADDER = [
    Rung("engine-defaults", "baseline", "nothing changed", {}),
    Rung("processed-logprobs", "semantics", "logprobs_mode=processed_logprobs",
         {"logprobs_mode": "processed_logprobs"}),
    Rung("explicit-runtime", "inference path",
         "prefix caching off, async scheduling off, chunked prefill off, eager, fixed seed",
         {"logprobs_mode": "processed_logprobs", "enable_prefix_caching": False,
          "async_scheduling": False, "enable_chunked_prefill": False, "enforce_eager": True}),
    Rung("weight-sync", "weight synchronisation",
         "in-place weight update with pause(keep), prefix-cache reset and digest check",
         {"logprobs_mode": "processed_logprobs", "enable_prefix_caching": False,
          "async_scheduling": False, "enable_chunked_prefill": False, "enforce_eager": True},
         push_weights=True),
    Rung("fp32-lm-head", "numerics", "lm_head in float32 on both sides (head_dtype=float32)",
         {"logprobs_mode": "processed_logprobs", "enable_prefix_caching": False,
          "async_scheduling": False, "enable_chunked_prefill": False, "enforce_eager": True,
          "lm_head_dtype": "float32"},
         fp32_lm_head=True, push_weights=True),
]


@dataclass
class DoctorConfig:
    model: str
    dtype: str = "float32"
    # Every rung is measured under each of these (sampling is per request: one engine serves all).
    samplings: list[SamplingConfig] = field(
        default_factory=lambda: [SamplingConfig(temperature=0.7, max_tokens=32)])
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    num_samples: int = 4
    seed: int = 0
    tol: float | None = None
    perturb_scale: float = 0.02  # relative size of the weight-sync rung's perturbation
    # Score the last rung's tokens in float64 too: the trainer's own rounding error per token.
    # None = when the model has at most 1e9 parameters (a float64 copy costs 8 bytes a parameter).
    fp64_reference: bool | None = None
    sabotage_skip: frozenset[str] = frozenset()  # tests: leave these tensors out of the push

    @property
    def tolerance(self) -> float:
        return self.tol if self.tol is not None else DEFAULT_TOL[self.dtype]


@dataclass
class RungResult:
    name: str
    layer: str
    sampling: SamplingConfig
    settings: dict
    metrics: dict
    abs_diffs: list[float]  # per token, for the report's plots
    positions: list[int]  # completion position of each token
    sync_check: str | None = None
    sync_ok: bool | None = None
    # Per token |lp(trainer, dtype) − lp(trainer, float64)|: how far the trainer itself is from
    # exact arithmetic. Filled on the last rung when DoctorConfig.fp64_reference holds.
    precision_error: list[float] | None = None


def perturb_in_place(model, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Move every parameter by `scale` times its own std (deterministic); returns the state dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            p.add_(noise * scale * (p.float().std().item() if p.numel() > 1 else 1.0))
    return model.state_dict()


def _measure(model, rollouts: list[Rollout], sampling: SamplingConfig, pad_id: int,
             fp32_lm_head: bool):
    recomputed = rollout_logprobs(model, rollouts, sampling, pad_id=pad_id,
                                  fp32_lm_head=fp32_lm_head)
    lp_train = torch.cat([r.logprobs for r in recomputed])
    lp_engine = torch.tensor([lp for r in rollouts for lp in r.logprobs])
    positions = [i for r in rollouts for i in range(r.num_tokens)]
    return (mismatch_metrics(lp_train, lp_engine), (lp_train - lp_engine).abs().tolist(), positions,
            lp_train)


def _wants_fp64(cfg: DoctorConfig, model) -> bool:
    if cfg.fp64_reference is not None:
        return cfg.fp64_reference
    return sum(p.numel() for p in model.parameters()) <= 1e9


def noise_floor(model, rollouts: list[Rollout], sampling: SamplingConfig, pad_id: int) -> dict:
    """The trainer against itself: the same tokens batched together vs one sequence at a time."""
    together = rollout_logprobs(model, rollouts, sampling, pad_id=pad_id, batch_size=16)
    alone = rollout_logprobs(model, rollouts, sampling, pad_id=pad_id, batch_size=1)
    return mismatch_metrics(torch.cat([r.logprobs for r in together]),
                            torch.cat([r.logprobs for r in alone]))


async def run_ladder(
    cfg: DoctorConfig, on_rung: Callable[[RungResult], None] | None = None,
    rungs: list[Rung] = LADDER,
) -> tuple[list[RungResult], dict]:
    """Run `rungs` in order; returns one result per rung and sampling, and the trainer's noise
    floor (measured on the first rung's rollouts of the first sampling)."""
    from parityrl.engine.engine import RolloutEngine
    from parityrl.models.load import load_policy
    from parityrl.models.tiny import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in cfg.prompts]
    model = load_policy(cfg.model, cfg.dtype)
    results: list[RungResult] = []
    floor: dict = {}
    engine, engine_overrides = None, None
    perturbed = False  # once the trainer's weights moved, a fresh engine must receive them
    try:
        for index, rung in enumerate(rungs):
            settings = EngineSettings.vllm_defaults(cfg.model, dtype=cfg.dtype, seed=cfg.seed,
                                                    **rung.engine)
            if engine is None or rung.engine != engine_overrides:
                if engine is not None:
                    await engine.close()
                engine = await RolloutEngine.start(settings)
                engine_overrides = rung.engine
                if perturbed:
                    await engine.update_weights(model.state_dict())
            sync_check = sync_ok = None
            if rung.push_weights:
                state = perturb_in_place(model, cfg.perturb_scale, seed=cfg.seed + index)
                perturbed = True
                report = await engine.update_weights(state, verify=False, skip=cfg.sabotage_skip)
                sync_check, sync_ok = report.check.summary(), report.check.ok
            resolved = engine.resolved_settings() | {"trainer_fp32_lm_head": rung.fp32_lm_head,
                                                     "trainer_dtype": cfg.dtype}
            for sampling in cfg.samplings:
                rollouts = await engine.generate_many(prompt_ids, sampling, n=cfg.num_samples,
                                                      seed=cfg.seed)
                metrics, abs_diffs, positions, lp_train = _measure(model, rollouts, sampling,
                                                                   pad_id, rung.fp32_lm_head)
                result = RungResult(rung.name, rung.layer, sampling, resolved, metrics, abs_diffs,
                                    positions, sync_check, sync_ok)
                if index == len(rungs) - 1 and _wants_fp64(cfg, model):
                    lp_exact = exact_logprobs(model, rollouts, sampling, pad_id=pad_id)
                    result.precision_error = (lp_train.double() - lp_exact).abs().tolist()
                results.append(result)
                if on_rung:
                    on_rung(result)
                if not floor:
                    floor = noise_floor(model, rollouts, sampling, pad_id)
    finally:
        if engine is not None:
            await engine.close()
    return results, floor


def run_ladder_sync(cfg: DoctorConfig, on_rung=None, rungs: list[Rung] = LADDER):
    return asyncio.run(run_ladder(cfg, on_rung, rungs))
