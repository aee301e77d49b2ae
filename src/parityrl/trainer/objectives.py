"""Policy losses and, as a separate and explicit layer, objective-side corrections.

Notation per completion token: lp = trainer logprob (with gradient), lp_b = behaviour logprob
reported by the engine, A = advantage. With no correction the policy ratio is taken against the
engine's logprobs, as PipelineRL does: any inference mismatch then shows straight in the ratio and
in the clip rate (on-policy and in parity, ratio = 1 exactly). A correction decouples the two: the
policy ratio is taken against the trainer's own logprobs before the update (lp.detach()), and the
behaviour→trainer gap w = exp(lp.detach() - lp_b) is handled by the correction (truncate, mask).

Losses are per-token; `aggregate_loss` turns them into the step's loss (token mean by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["ppo", "gspo", "reinforce"] = Field(
        "ppo", description="ppo: clipped token ratio; gspo: clipped sequence ratio (geometric mean "
                           "of token ratios); reinforce: A·logp weighted by a truncated IS weight.")
    clip_low: float = Field(0.2, ge=0, description="ratio floor is 1 - clip_low (ppo/gspo).")
    clip_high: float = Field(0.2, ge=0, description="ratio ceiling is 1 + clip_high (ppo/gspo).")
    reinforce_is_cap: float = Field(2.0, gt=0, description="reinforce: weight = min(ratio, cap).")
    kl_coef: float = Field(0.0, ge=0, description="k3 KL to a frozen reference model; 0 = off.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus; 0 = off.")
    aggregation: Aggregation = Field(
        "token-mean", description="How per-token losses become the step's loss: token-mean (sum "
                                  "/ the step's tokens), seq-mean-token-mean (each sequence's "
                                  "mean, then the mean over sequences: GRPO's original), "
                                  "seq-mean-token-sum (each sequence's sum / aggregation_length, "
                                  "then the mean over sequences: Dr. GRPO). docs/recipes.md.")
    aggregation_length: int | None = Field(
        None, ge=1, description="seq-mean-token-sum's constant divisor; None = "
                                "sampling.max_tokens (resolved in the run's config).")


class CorrectionConfig(BaseModel):
    """Objective-side corrections for the engine/trainer gap. Off by default: fix parity first."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "tis", "mis", "icepop"] = Field(
        "none", description="tis: weight tokens by min(w, cap); mis: drop tokens or sequences whose "
                            "w is outside [low, high]; icepop: drop tokens whose w is outside "
                            "[low, high] (token level, its paper's bounds 0.5 and 5).")
    cap: float = Field(2.0, gt=0, description="tis: truncation cap C.")
    low: float | None = Field(None, ge=0, description="mis/icepop lower bound (default 0.5).")
    high: float | None = Field(None, gt=0, description="mis/icepop upper bound (mis 2, icepop 5).")
    level: Literal["token", "sequence"] = Field(
        "token", description="mis: token, or sequence (geometric mean of w over the sequence).")

    def bounds(self) -> tuple[float, float]:
        default_high = 5.0 if self.type == "icepop" else 2.0
        return (0.5 if self.low is None else self.low,
                default_high if self.high is None else self.high)


@dataclass
class TokenLoss:
    loss: torch.Tensor  # [N] per-token loss (to be summed / total tokens)
    ratio: torch.Tensor  # [N] policy ratio used by the loss (detached)
    clipped: torch.Tensor  # [N] bool: the clip bound is what the gradient sees
    # [N] detached: tis → the truncated weight multiplied into the loss; mis/icepop → the
    # behaviour→trainer ratio w the keep/drop decision was made on (kept tokens are not reweighted)
    is_weight: torch.Tensor | None = None
    truncated: torch.Tensor | None = None  # [N] bool (tis)
    masked: torch.Tensor | None = None  # [N] bool (mis/icepop): token dropped


def _segment_mean(x: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Mean of x over each sequence, broadcast back to its tokens."""
    sums = torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add_(0, seq_ids, x)
    counts = torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add_(
        0, seq_ids, torch.ones_like(x))
    return (sums / counts.clamp_min(1))[seq_ids]


def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float):
    unclipped = ratio * adv
    clipped_ratio = ratio.clamp(1 - low, 1 + high)
    surrogate = torch.minimum(unclipped, clipped_ratio * adv)
    # The clip is active where the clipped term is the (strictly) smaller one: no gradient there.
    active = (clipped_ratio * adv < unclipped).detach()
    return -surrogate, active


def policy_loss(
    lp: torch.Tensor, lp_b: torch.Tensor, adv: torch.Tensor, seq_ids: torch.Tensor,
    num_seqs: int, loss: LossConfig, correction: CorrectionConfig,
) -> TokenLoss:
    """Per-token policy loss for flat tensors over the step's completion tokens.

    Args:
        lp: trainer logprobs [N], with gradient. lp_b: engine (behaviour) logprobs [N].
        adv: advantage of each token's sequence [N]. seq_ids: sequence index of each token [N].
    """
    lp_b = lp_b.to(lp.dtype)
    w = torch.exp(lp.detach() - lp_b)  # behaviour → trainer gap (mismatch + lag)
    base = lp_b if correction.type == "none" else lp.detach()
    log_ratio = lp - base

    if loss.type == "ppo":
        ratio = torch.exp(log_ratio)
        per_token, clipped = _clipped_surrogate(ratio, adv, loss.clip_low, loss.clip_high)
    elif loss.type == "gspo":
        seq_log_ratio = _segment_mean(log_ratio, seq_ids, num_seqs)
        # Value of the sequence ratio, gradient of the token: s_i · exp(lp_t - sg(lp_t)).
        ratio = torch.exp(seq_log_ratio.detach() + lp - lp.detach())
        per_token, clipped = _clipped_surrogate(ratio, adv, loss.clip_low, loss.clip_high)
    elif loss.type == "reinforce":
        ratio = torch.exp(log_ratio.detach())
        weight = ratio.clamp(max=loss.reinforce_is_cap)
        per_token = -weight * adv * lp
        clipped = ratio > loss.reinforce_is_cap
    else:  # pragma: no cover - pydantic restricts the values
        raise ValueError(loss.type)

    out = TokenLoss(per_token, ratio.detach(), clipped)
    if correction.type == "tis":
        out.is_weight = w.clamp(max=correction.cap)
        out.truncated = w > correction.cap
        out.loss = per_token * out.is_weight
    elif correction.type in ("mis", "icepop"):
        low, high = correction.bounds()
        level = "token" if correction.type == "icepop" else correction.level
        measure = w if level == "token" else torch.exp(
            _segment_mean(torch.log(w), seq_ids, num_seqs))
        keep = (measure >= low) & (measure <= high)
        out.is_weight = w
        out.masked = ~keep
        out.loss = per_token * keep.to(per_token.dtype)
    return out


def aggregate_loss(per_token: torch.Tensor, seq_ids: torch.Tensor, seq_lengths: torch.Tensor,
                   how: Aggregation, *, total_tokens: int, num_seqs: int,
                   length: int | None) -> torch.Tensor:
    """This micro-batch's share of the step's loss. `seq_ids`: each token's row in the micro-batch;
    `seq_lengths`: each row's sampled tokens; `total_tokens`, `num_seqs`: the whole step's
    (micro-batch shares add up to the step's loss).

    A token of a sequence of n tokens weighs 1/total_tokens (token-mean: every token alike, so
    long sequences weigh more in the step), 1/(num_seqs·n) (seq-mean-token-mean: every sequence
    alike, so a token of a long one weighs less, a bias towards long wrong answers), or
    1/(num_seqs·length) (seq-mean-token-sum: every token alike again, and the step's scale does
    not depend on how long its completions were).
    """
    if how == "token-mean":
        return per_token.sum() / total_tokens
    if how == "seq-mean-token-mean":
        return (per_token / seq_lengths.to(per_token.dtype)[seq_ids]).sum() / num_seqs
    if how == "seq-mean-token-sum":
        if length is None:
            raise ValueError("seq-mean-token-sum needs its constant length")
        return per_token.sum() / (num_seqs * length)
    raise ValueError(how)  # pragma: no cover - pydantic restricts the values


def kl_k3(lp: torch.Tensor, lp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref) on tokens sampled from (about) π_θ."""
    delta = lp_ref - lp
    return torch.exp(delta) - delta - 1
