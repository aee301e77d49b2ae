"""Dynamic sampling (DAPO): a group whose rewards are all equal carries no signal, so drop it and
draw another problem until the step has its groups with signal.

Under a group-relative advantage every rollout of such a group has advantage 0: it costs a
forward and backward and moves nothing but the token mean's denominator. Dropping it keeps each
step's batch full of groups that teach. The price is generation: `rl/generation_overdraw` says how
much more was generated than trained on. A step may draw at most `max_draws` × prompts_per_step
groups; at that cap it trains on the groups with signal it has (`at_cap: train_fewer`, at least
one), or keeps drawing and says so (`at_cap: wait`).

The signal is judged on the reward the actor computed (task and learned rewards), before the
trainer's overlong shaping. A dropped group's problem is done: the ledger marks it `no_signal`,
so a resumed run does not draw it again.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from parityrl.core.rollout import Group


class DynamicSamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Drop groups whose rewards are all equal and draw "
                                             "others until the step has prompts_per_step groups "
                                             "with signal (DAPO).")
    max_draws: float = Field(3.0, ge=1, description="A step draws at most this many times "
                                                    "prompts_per_step groups (kept + dropped).")
    at_cap: Literal["train_fewer", "wait"] = Field(
        "train_fewer", description="At max_draws: train on the groups with signal it has (at "
                                   "least one), or keep drawing (a warning each time a step "
                                   "passes the cap).")

    def dropped_at_cap(self, prompts_per_step: int) -> int:
        """Groups a step may drop before it is at the cap."""
        return max(math.ceil(self.max_draws * prompts_per_step) - prompts_per_step, 0)

    def stop_waiting_after(self, prompts_per_step: int) -> int | None:
        """Dropped groups after which a step trains on what it has (None: it waits for all)."""
        if not self.enabled or self.at_cap == "wait":
            return None
        return self.dropped_at_cap(prompts_per_step)


def has_signal(group: Group) -> bool:
    """Some reward differs from another: a group-relative advantage is non-zero somewhere."""
    return len({r.reward for r in group}) > 1
