"""The trainer of a run, built from its config: the policy loaded from the model folder in the
run's dtype, its LoRA adapter attached, the KL reference beside it.

The local backend builds it in-process (pipeline.py `start_trainer`); with `cluster.backend: ray`
every trainer rank builds the same one (cluster/trainer_role.py).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from parityrl.models.load import load_policy
from parityrl.trainer.lora import attach_lora
from parityrl.trainer.trainer import Trainer

if TYPE_CHECKING:
    from parityrl.config import RunConfig


def seed_process(seed: int) -> None:
    """Python's and torch's generators of this process, as every trainer's start sets them."""
    random.seed(seed)
    torch.manual_seed(seed)


def build_trainer(cfg: RunConfig, model_dir: str | Path, pad_id: int, dist=None) -> Trainer:
    """The trainer of a run: the policy (and the KL reference when kl_coef > 0) loaded from
    `model_dir` in the run's dtype, the seeds set first so every rank and backend starts alike."""
    seed_process(cfg.seed)
    attn = cfg.trainer.attn_implementation
    model = load_policy(model_dir, cfg.dtype, attn)
    if cfg.trainer.lora is not None:
        lora = cfg.trainer.lora
        attach_lora(model, lora.rank, lora.alpha, lora.targets, lora.rslora, seed=cfg.seed)
    ref = load_policy(model_dir, cfg.dtype, attn) if cfg.trainer.loss.kl_coef > 0 else None
    return Trainer(cfg, model, pad_id, ref, dist=dist)
