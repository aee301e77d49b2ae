"""Dynamic loss scaling for float16 training.

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero in the backward pass. The loss is
multiplied by a scale before backward, and the gradients divided by it again before the optimizer
sees them (in float32, on the master weights). A step whose gradients overflowed (a non-finite
norm after unscaling) is skipped, never applied, and the scale halved; after `growth_interval`
clean steps in a row it doubles. That is the rule of torch.amp.GradScaler; it is written out here
because the overflow test is the trainer's own global gradient norm (one number, the same on every
FSDP2 rank), where GradScaler checks each tensor per device and has no FSDP2 variant.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LossScaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "dynamic", "off"] = Field(
        "auto", description="dynamic: scale the loss, skip and count overflowing steps; "
                            "auto = dynamic for float16 runs, off otherwise.")
    init: float = Field(2.0 ** 16, gt=0, description="First scale (torch.amp's default).")
    growth_interval: int = Field(200, ge=1, description="Clean steps in a row before doubling.")
    min_scale: float = Field(1.0, gt=0, description="An overflow at this scale is a real "
                             "non-finite gradient: it counts toward max_nonfinite_steps.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_scale > self.init:
            raise ValueError(f"loss_scale.min_scale={self.min_scale} is above init={self.init}")
        return self


class DynamicLossScale:
    def __init__(self, cfg: LossScaleConfig) -> None:
        self.cfg = cfg
        self.scale = cfg.init
        self.clean_steps = 0  # applied steps since the last change of scale
        self.overflow_steps = 0  # skipped steps over the whole run

    def update(self, finite: bool) -> bool:
        """After a step's gradient norm: True when the overflow was a real fault (at min_scale)."""
        if finite:
            self.clean_steps += 1
            if self.clean_steps >= self.cfg.growth_interval:
                self.scale, self.clean_steps = self.scale * 2.0, 0
            return False
        self.overflow_steps += 1
        self.clean_steps = 0
        at_floor = self.scale <= self.cfg.min_scale
        self.scale = max(self.scale / 2.0, self.cfg.min_scale)
        return at_floor

    def state(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps,
                "overflow_steps": self.overflow_steps}

    def load(self, state: dict | None) -> None:
        if state:
            self.scale = float(state["scale"])
            self.clean_steps = int(state["clean_steps"])
            self.overflow_steps = int(state["overflow_steps"])
