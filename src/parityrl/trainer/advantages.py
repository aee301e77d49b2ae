"""Group-relative advantages: each sample's reward against the other samples of its prompt."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class AdvantageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    baseline: str = Field("mean", pattern="^(mean|leave_one_out)$",
                          description="mean: group mean (GRPO); leave_one_out: mean of the others "
                                      "(RLOO), which keeps the baseline independent of the sample.")
    std_normalize: bool = Field(True, description="Divide by the group's reward std (GRPO).")
    eps: float = Field(1e-6, gt=0, description="Added to the std before dividing.")


def group_advantages(rewards: torch.Tensor, cfg: AdvantageConfig) -> torch.Tensor:
    """Advantages for one group's rewards [G] (float). A group of identical rewards gives zeros."""
    rewards = rewards.double()
    g = rewards.numel()
    if g == 0 or bool(rewards.max() == rewards.min()):
        # No signal in the group; exact zeros (a mean can be one rounding step off the value).
        return torch.zeros(g, dtype=torch.float32)
    if cfg.baseline == "leave_one_out" and g > 1:
        baseline = (rewards.sum() - rewards) / (g - 1)
    else:
        baseline = rewards.mean().expand_as(rewards)
    adv = rewards - baseline
    if cfg.std_normalize and g > 1:
        adv = adv / (rewards.std(unbiased=False) + cfg.eps)
    return adv.float()
