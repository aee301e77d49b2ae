"""The mismatch metrics: how far the trainer's token logprobs are from the engine's.

With d = lp_train - lp_engine per token (same tokens, same weights, same processing):
mean_diff shows a systematic (semantic) offset, kl_k1 / kl_k3 estimate KL(engine ‖ trainer) on tokens
the engine sampled, and clip_frac@0.2 is the clip rate an on-policy PPO step would see from the
mismatch alone. Used by `parityrl doctor` and, per step, by the trainer.

A non-finite logprob on either side is never averaged: such tokens are counted
(`mismatch/nonfinite_tokens`) and the other metrics are over the finite ones.
"""

from __future__ import annotations

import torch

METRIC_NAMES = (
    "mismatch/mean_diff",
    "mismatch/mean_abs_diff",
    "mismatch/p99_abs_diff",
    "mismatch/max_abs_diff",
    "mismatch/kl_k1",
    "mismatch/kl_k3",
    "mismatch/clip_frac@0.2",
)


def mismatch_metrics(lp_train: torch.Tensor, lp_engine: torch.Tensor,
                     outside_nucleus: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics over two flat tensors of per-token logprobs (float64 to keep tiny diffs exact).

    `outside_nucleus` (flat bool, same tokens): the sampled token was outside the trainer's own
    top-k/top-p set; its share is `mismatch/nucleus_boundary_frac`.
    """
    d = lp_train.detach().double().flatten() - lp_engine.detach().double().flatten()
    finite = torch.isfinite(d)
    extra = {"mismatch/tokens": int(finite.sum()), "mismatch/nonfinite_tokens": int((~finite).sum())}
    if outside_nucleus is not None:
        extra["mismatch/nucleus_boundary_frac"] = (
            outside_nucleus.double().mean().item() if outside_nucleus.numel() else float("nan"))
    d = d[finite]
    if d.numel() == 0:
        return {name: float("nan") for name in METRIC_NAMES} | extra
    abs_d = d.abs()
    return {
        "mismatch/mean_diff": d.mean().item(),
        "mismatch/mean_abs_diff": abs_d.mean().item(),
        "mismatch/p99_abs_diff": torch.quantile(abs_d, 0.99).item(),
        "mismatch/max_abs_diff": abs_d.max().item(),
        "mismatch/kl_k1": (-d).mean().item(),
        "mismatch/kl_k3": (d.exp() - 1 - d).mean().item(),
        "mismatch/clip_frac@0.2": ((d.exp() - 1).abs() > 0.2).double().mean().item(),
    } | extra


def per_turn_mismatch(lp_train: torch.Tensor, lp_engine: torch.Tensor,
                      turns: torch.Tensor) -> dict[str, float]:
    """`mismatch/turn<k>/*` for each turn index k among the parity tokens: a later turn is
    prefilled from a longer context, and may be sampled by newer weights than the first."""
    m: dict[str, float] = {}
    for turn in sorted(set(turns.tolist())):
        one = mismatch_metrics(lp_train[turns == turn], lp_engine[turns == turn])
        for name in ("mismatch/max_abs_diff", "mismatch/mean_abs_diff", "mismatch/kl_k3",
                     "mismatch/tokens"):
            m[name.replace("mismatch/", f"mismatch/turn{turn}/")] = float(one[name])
    return m
