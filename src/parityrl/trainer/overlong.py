"""Completions cut at `sampling.max_tokens`: left as they are, masked out of the loss, or shaped.

A completion the engine cut at the limit was judged on an unfinished answer: its reward says
little about the tokens that led there. DAPO's two remedies:

- mask: a cut completion adds nothing to the loss and does not count in its denominators (it
  still counts in its group's advantages, as the others' baseline);
- shape: every completion's reward gets a soft length penalty over the last `window` tokens before
  the limit L: 0 up to L − window, then falling linearly to −penalty at L
  ((L − window − n) / window · penalty for a completion of n tokens).

The trainer applies either before the step's advantages; `rl/truncated_frac` is the step's share
of cut completions whatever the mode.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from parityrl.core.rollout import Rollout


class OverlongConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "mask", "shape"] = Field(
        "off", description="Completions cut at sampling.max_tokens: off (trained on as they "
                           "are), mask (out of the loss), shape (DAPO's soft length penalty on "
                           "every completion's reward).")
    window: int = Field(4, ge=1, description="shape: tokens before the limit over which the "
                                             "penalty grows (DAPO's L_cache); below "
                                             "sampling.max_tokens.")
    penalty: float = Field(1.0, ge=0, description="shape: the penalty at the limit.")


def is_truncated(rollout: Rollout) -> bool:
    """The engine stopped it at max_tokens, not at a stop token."""
    return rollout.finish_reason == "length"


def length_penalty(num_tokens: int, max_tokens: int, cfg: OverlongConfig) -> float:
    """DAPO's soft overlong penalty (≤ 0) of a completion of `num_tokens` sampled tokens."""
    start = max_tokens - cfg.window
    if num_tokens <= start:
        return 0.0
    return (start - min(num_tokens, max_tokens)) / cfg.window * cfg.penalty
