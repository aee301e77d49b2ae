"""How far the trainer itself is from exact arithmetic: a float64 evaluation of the same weights.

An absolute bound on |lp_trainer − lp_engine| cannot hold where the trainer's own rounding error is
larger than the bound: two correct implementations in one dtype each sit within their rounding
error of the exact value, so they may differ by about twice it. On the warm-started demo model
float32 is 1.2e-4 away from float64 on some tokens. `within_precision` is the per-token rule the
doctor and the training metrics share: |Δ| <= tol + 2 × |lp_trainer − lp_float64|.
"""

from __future__ import annotations

import copy

import torch

from parityrl.rollouts.types import Rollout
from parityrl.sampling import SamplingConfig
from parityrl.trainer.batch import rollout_logprobs


def exact_logprobs(model, rollouts: list[Rollout], sampling: SamplingConfig, *,
                   pad_id: int) -> torch.Tensor:
    """Flat float64 logprobs of every completion token of `rollouts`, in rollout order."""
    if not rollouts:
        return torch.zeros(0, dtype=torch.float64)
    exact_model = copy.deepcopy(model).to(torch.float64)
    scored = rollout_logprobs(exact_model, rollouts, sampling, pad_id=pad_id)
    return torch.cat([r.logprobs for r in scored])


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
    return {
        "mismatch/precision_error_max": error.max().item(),
        "mismatch/engine_error_max": (lp_engine - lp_exact).abs().max().item(),
        "mismatch/beyond_tol_frac": (abs_diff > tol).double().mean().item(),
        "mismatch/beyond_precision_frac":
            (~within_precision(abs_diff, error, tol)).double().mean().item(),
    }
