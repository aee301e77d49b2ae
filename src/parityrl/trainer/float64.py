"""How far a logprob is from exact arithmetic: a float64 evaluation of the same weights.

Two correct implementations in one dtype each sit within their rounding error of the exact value,
so an absolute bound on |lp_trainer − lp_engine| cannot hold where that error is larger than the
bound (on a 30-layer real model in float32 it reaches 3e-5 per token). What can be checked is that
the engine is as close to the exact value as the trainer is: the doctor's verdict and the training
metrics compare the engine's error against float64 with the trainer's own.
"""

from __future__ import annotations

import copy

import torch

from parityrl.core.hf import BUILDING_MODEL
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.trainer.batch import rollout_logprobs
from parityrl.trainer.layout import to_model_layout


def _loop_over_experts(model):
    """Mixture-of-experts models run their experts with torch's grouped GEMM, which has no
    float64 kernel; the reference runs each expert on its tokens instead (transformers' eager
    path): the same arithmetic, any dtype."""
    implementation = getattr(model.config, "_experts_implementation", None)
    if implementation not in (None, "eager") and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model


class Float64Reference:
    """A float64 copy of a model, refreshed from the model's current weights on demand."""

    def __init__(self, model) -> None:
        self.model = _loop_over_experts(copy.deepcopy(model).to(torch.float64).eval())

    @classmethod
    def from_weights(cls, config, weights: dict[str, torch.Tensor]) -> "Float64Reference":
        """A float64 model of `config` holding `weights` (e.g. gathered from sharded ranks)."""
        from transformers import AutoModelForCausalLM

        self = cls.__new__(cls)
        with BUILDING_MODEL:
            self.model = _loop_over_experts(
                AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval())
        # `weights` in the checkpoint's layout (Trainer.weights): MoE experts fused again.
        self.model.load_state_dict(to_model_layout(self.model, weights))
        return self

    def refresh(self, model) -> None:
        """Copy the weights of `model` (any dtype) into the float64 copy."""
        with torch.no_grad():
            mine = dict(self.model.named_parameters())
            for name, param in model.named_parameters():
                mine[name].copy_(param)

    def logprobs(self, rollouts: list[Rollout], sampling: SamplingConfig, *, pad_id: int,
                 fp32_lm_head: bool = True, replay_routes: bool = False) -> torch.Tensor:
        """Flat float64 logprobs of every completion token of `rollouts`, in rollout order
        (`replay_routes`: MoE, on the engine's routes)."""
        if not rollouts:
            return torch.zeros(0, dtype=torch.float64)
        scored = rollout_logprobs(self.model, rollouts, sampling, pad_id=pad_id,
                                  fp32_lm_head=fp32_lm_head, replay_routes=replay_routes)
        return torch.cat([r.logprobs for r in scored])


def exact_logprobs(model, rollouts: list[Rollout], sampling: SamplingConfig, *,
                   pad_id: int) -> torch.Tensor:
    """Flat float64 logprobs of `rollouts` under `model`'s current weights (a one-off copy)."""
    return Float64Reference(model).logprobs(rollouts, sampling, pad_id=pad_id)


def error_stats(lp: torch.Tensor, lp_exact: torch.Tensor) -> dict[str, float]:
    """|lp − lp_exact| over the finite tokens: mean, p99, max."""
    err = (lp.double() - lp_exact.double()).abs()
    err = err[torch.isfinite(err)]
    if err.numel() == 0:
        return {}
    return {"mean": err.mean().item(), "p99": torch.quantile(err, 0.99).item(),
            "max": err.max().item()}


def within_precision(abs_diff: torch.Tensor, precision_error: torch.Tensor, tol: float) -> torch.Tensor:
    """Per token: is the engine/trainer difference explained by tolerance plus rounding?"""
    return abs_diff <= tol + 2 * precision_error


def precision_metrics(lp_train: torch.Tensor, lp_engine: torch.Tensor, lp_exact: torch.Tensor,
                      tol: float) -> dict[str, float]:
    """Training-run metrics over the same flat tokens as `mismatch_metrics`."""
    if lp_exact.numel() == 0:
        return {}
    lp_train, lp_engine = lp_train.detach().double(), lp_engine.double()
    abs_diff = (lp_train - lp_engine).abs()
    error = (lp_train - lp_exact).abs()
    trainer, engine = error_stats(lp_train, lp_exact), error_stats(lp_engine, lp_exact)
    out = {
        "mismatch/precision_error_max": trainer.get("max", float("nan")),
        "mismatch/engine_error_max": engine.get("max", float("nan")),
        "mismatch/precision_error_mean": trainer.get("mean", float("nan")),
        "mismatch/engine_error_mean": engine.get("mean", float("nan")),
        "mismatch/beyond_tol_frac": (abs_diff > tol).double().mean().item(),
        "mismatch/beyond_precision_frac":
            (~within_precision(abs_diff, error, tol)).double().mean().item(),
    }
    if trainer.get("mean"):
        out["mismatch/engine_error_ratio"] = engine["mean"] / trainer["mean"]
    return out
