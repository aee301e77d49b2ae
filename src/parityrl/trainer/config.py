"""The trainer's configuration: the `trainer:` and `parity:` sections of a run's config.

The trainer reads only what `RunSections` names, so it takes a whole run config (config.py
RunConfig) without importing the layer that composes it.
"""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from parityrl.core.sampling import SamplingConfig
from parityrl.trainer.advantages import AdvantageConfig
from parityrl.trainer.loss_scale import LossScaleConfig
from parityrl.trainer.objectives import CorrectionConfig, LossConfig
from parityrl.trainer.overlong import OverlongConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimConfig(Strict):
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (constant).")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW's (beta1, beta2).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this "
                                                    "before each step.")
    tokens_per_microbatch: int = Field(8192, ge=1, description="Gradient accumulation budget.")
    master_weights: Literal["float32", "model"] = Field(
        "float32", description="bfloat16/float16 models: the optimizer steps float32 master "
                               "weights (model = step the low-precision weights themselves).")
    loss_scale: LossScaleConfig = Field(LossScaleConfig(), description="trainer/loss_scale.py: "
                                        "dynamic loss scaling (float16).")


class LoRAConfig(Strict):
    """A LoRA adapter trained instead of every weight (trainer/lora.py): the base stays frozen,
    the optimizer, checkpoints and the update sent to the engines cover the adapter only."""

    rank: int = Field(8, ge=1, description="Adapter rank r.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is alpha/r · BA.")
    targets: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Every linear of the decoder (the lm_head excluded), or the "
                                  "module names to adapt, e.g. [q_proj, v_proj].")
    rslora: bool = Field(False, description="Scale by alpha/√r instead of alpha/r.")


class TrainerConfig(Strict):
    fp32_lm_head: bool = Field(True, description="lm_head projection in float32.")
    lora: LoRAConfig | None = Field(None, description="Train a LoRA adapter; None = every "
                                                      "weight (full fine-tuning).")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="The trainer model's attention in transformers (and the KL "
                            "reference model's): sdpa (torch's fused kernel) or eager.")
    moe_routing: Literal["recompute", "replay"] = Field(
        "recompute", description="Mixture-of-experts models: route by the trainer's own router "
                                 "(recompute), or send each position to the experts the engine "
                                 "chose, gate weights from the trainer's router (replay; R3).")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="Consecutive steps with a non-finite gradient (not applied) before "
                             "the run stops.")
    loss: LossConfig = Field(LossConfig(), description="trainer/objectives.py: the policy "
                             "loss.")
    correction: CorrectionConfig = Field(CorrectionConfig(), description="trainer/objectives.py: "
                                         "objective-side correction for the engine/trainer gap "
                                         "(off by default: fix parity first).")
    advantage: AdvantageConfig = Field(AdvantageConfig(), description="trainer/advantages.py: "
                                       "group-relative advantages.")
    overlong: OverlongConfig = Field(OverlongConfig(), description="trainer/overlong.py: "
                                     "completions cut at sampling.max_tokens (mask, or DAPO's "
                                     "soft length penalty).")
    optim: OptimConfig = Field(OptimConfig(), description="The AdamW optimizer, gradient "
                               "accumulation and clipping.")
    skip_zero_advantage: bool = Field(
        False, description="Rollouts whose advantage is exactly 0 skip the forward and backward "
                           "when the loss gives them no gradient (no KL, no entropy bonus): the "
                           "same update for less compute. Their tokens still count in the token "
                           "mean, but they are not scored for parity: mismatch/coverage says how "
                           "much was, and a step whose groups all have advantage 0 has no token "
                           "metrics. Off: every token is scored.")
    sort_by_length: bool = Field(
        True, description="Cut micro-batches from the rollouts sorted by length, so that rows "
                          "of a micro-batch pad little. Changes only the order gradients are "
                          "summed in.")


class ParityConfig(Strict):
    mode: Literal["default", "bitwise"] = Field(
        "default", description="bitwise: the trainer scores tokens with the engine's own kernels "
                               "(trainer/engine_kernels.py), equal bit for bit, multi-turn "
                               "episodes included; float32, CPU engine, cluster.backend=local. "
                               "The engine knobs it needs are set for you.")
    alarm_kl_k3: float = Field(1e-3, gt=0, description="Alarm when mismatch/kl_k3 exceeds this.")
    on_alarm: Literal["warn", "stop", "ignore"] = Field(
        "warn", description="When mismatch/kl_k3 exceeds alarm_kl_k3: warn (print the alarm and "
                            "the doctor command, go on), stop (end the run), ignore (no check).")
    probe_rollouts: int = Field(64, ge=0, description="Queued rollouts sampled by the current "
                                                       "weights scored each step for parity.")
    probe_wait_s: float = Field(1.0, ge=0, description="How long a step waits for the first such "
                                                       "rollout before it gives up measuring.")
    fp64_reference: bool = Field(
        False, description="Also score those rollouts in float64 each step: the trainer's own "
                           "rounding error, and the share of tokens it does not explain "
                           "(mismatch/beyond_precision_frac). Costs a float64 copy of the model.")
    tolerance: float = Field(1e-5, gt=0, description="Per-token |Δ logprob| bound for "
                                                     "mismatch/beyond_*_frac.")
    routes_per_layer: bool = Field(False, description="MoE: also log "
                                                      "mismatch/route_disagreement/layer<i>.")
    compare_routing: bool = Field(
        False, description="MoE with trainer.moe_routing=replay: also score the parity tokens "
                           "with the trainer's own routing each step (routing/recompute_*): "
                           "what replay changed, on the same tokens. One more forward.")


class _Sharding(Protocol):
    split_batch: bool


class RunSections(Protocol):
    """The sections of a run's config the trainer reads."""

    trainer: TrainerConfig
    sampling: SamplingConfig
    parity: ParityConfig
    cluster: _Sharding
