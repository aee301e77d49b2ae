"""Rollouts → padded trainer tensors, and the trainer-side logprobs of a list of rollouts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.trainer.logprobs import LogprobsMode, TokenLogprobs, token_logprobs
from parityrl.trainer.routing import routes_tensor


@dataclass
class RolloutBatch:
    """Right-padded [B, T] tensors; per-token fields are aligned to `input_ids[:, 1:]` ([B, T-1])."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # [B, T]: 1 at sampled completion tokens (not observations)
    engine_logprobs: torch.Tensor  # [B, T-1]
    versions: torch.Tensor  # [B, T-1], -1 outside completions
    routes: torch.Tensor | None = None  # MoE: the engine's experts [B, T, layers, top_k], -1 none

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(**{k: None if v is None else v.to(device)
                               for k, v in self.__dict__.items()})


def collate(rollouts: list[Rollout], pad_id: int) -> RolloutBatch:
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    B, T = len(rollouts), max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    completion = torch.zeros((B, T), dtype=torch.long)
    engine_lp = torch.zeros((B, T - 1), dtype=torch.float32)
    versions = torch.full((B, T - 1), -1, dtype=torch.long)
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        input_ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
        attention[i, : p + c] = 1
        # Observation tokens of an episode are context: outside the mask, never scored.
        completion[i, p : p + c] = torch.tensor(r.sampled_mask, dtype=torch.long)
        # Token at position t is predicted at position t-1: shift by one.
        engine_lp[i, p - 1 : p + c - 1] = torch.tensor(r.logprobs, dtype=torch.float32)
        versions[i, p - 1 : p + c - 1] = torch.tensor(r.versions)
    routes = routes_tensor([r.routes for r in rollouts], (B, T))
    return RolloutBatch(input_ids, attention, completion, engine_lp, versions, routes)


def rollout_logprobs(
    model, rollouts: list[Rollout], sampling: SamplingConfig, *, pad_id: int,
    batch_size: int = 16, fp32_lm_head: bool = True,
    logprobs_mode: LogprobsMode = "processed_logprobs", kernels=None,
    replay_routes: bool = False,
) -> list[TokenLogprobs]:
    """Trainer logprobs of each rollout's completion tokens, in micro-batches, without gradients.

    `kernels`: bitwise mode; `replay_routes`: MoE routing replay (see `token_logprobs`). Returns
    one TokenLogprobs per rollout whose tensors are 1-D over its sampled tokens (aligned with
    `Rollout.sampled_logprobs`), with the rollout's route counts when it carries routes.
    """
    device = next(model.parameters()).device
    out: list[TokenLogprobs] = []
    with torch.no_grad():
        for start in range(0, len(rollouts), batch_size):
            chunk = rollouts[start : start + batch_size]
            batch = collate(chunk, pad_id).to(device)
            result = token_logprobs(
                model, batch.input_ids, batch.attention_mask, batch.completion_mask, sampling,
                fp32_lm_head=fp32_lm_head, logprobs_mode=logprobs_mode, kernels=kernels,
                routes=batch.routes, replay_routes=replay_routes,
            )
            for i in range(len(chunk)):
                row = result.mask[i]
                out.append(TokenLogprobs(result.logprobs[i][row].cpu(), result.entropy[i][row].cpu(),
                                         torch.ones(int(row.sum()), dtype=torch.bool),
                                         result.outside_nucleus[i][row].cpu(),
                                         result.routes and result.routes.row(i)))
    return out
