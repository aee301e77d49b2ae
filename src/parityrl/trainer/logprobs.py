"""Trainer-side token logprobs: THE function that must agree with the engine.

`parityrl doctor` and the RL trainer both call `token_logprobs`; nothing else in the code base turns
logits into logprobs of sampled tokens. It reproduces the processing of vLLM V1's sampler for the
steps `SamplingConfig` allows (see parityrl/core/sampling.py):

    hidden states ─► lm_head (fp32 if asked) ─► float32 ─► / temperature ─► top-k mask ─► top-p mask
                  ─► log_softmax ─► gather the sampled token

Top-k keeps every token whose logit is >= the k-th largest (ties kept), top-p sorts ascending and
masks tokens whose cumulative probability is <= 1 - p, always keeping the most likely one; both
exactly as `apply_top_k_top_p_pytorch` in vllm/v1/sample/ops/topk_topp_sampler.py.

Bitwise mode (`kernels`, trainer/engine_kernels.py): the values come from the engine's own kernels
run on the trainer's weights, equal to the engine's logprobs bit for bit; the gradient (when one
is needed) comes from the ordinary forward above, through `exact + (x - x.detach())`.

The nucleus rule: the token the engine sampled is always kept. The engine drew it from its own
kept set, computed from logits that differ from the trainer's by rounding; where the token sits at
the edge of that set, the trainer's own set may leave it out, and its logprob would be -inf (seen
on SmolLM2-135M in bfloat16 at top-p 0.9). The trainer's set is therefore its own set ∪ {the
sampled token}, and how often that union was needed is reported (`outside_nucleus`,
`mismatch/nucleus_boundary_frac`). vLLM 0.32 can return the engine's kept set only on GPU (Model
Runner V2's `return_sampling_mask`), so the CPU engine cannot replay it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from parityrl.core.errors import UserError
from parityrl.core.sampling import SamplingConfig
from parityrl.trainer.engine_kernels import Sequence, processed_logprobs
from parityrl.trainer.routing import RouteCounts, compare_routes, engine_routing

LogprobsMode = Literal["processed_logprobs", "raw_logprobs"]


@dataclass
class TokenLogprobs:
    """Per-completion-token outputs, shape [batch, max_completion_len], zero where `mask` is False."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor
    # True where the sampled token lies outside the trainer's own top-k/top-p set (kept anyway).
    outside_nucleus: torch.Tensor | None = None
    # MoE with the engine's routes: the trainer's routing compared with them (trainer/routing.py)
    routes: RouteCounts | None = None


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    # float32 as the engine computes; float64 stays float64 (the doctor's precision reference).
    return t if t.dtype == torch.float64 else t.float()


def process_logits(logits: torch.Tensor, sampling: SamplingConfig,
                   sampled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the engine sampler's processing to logits [N, V]; masked tokens become -inf.

    `sampled` ([N] token ids) are never masked (the nucleus rule above). Returns the processed
    float32 (or float64) logits and, per row, whether the sampled token was outside the set that
    top-k/top-p alone would keep (all False without `sampled` or without top-k/top-p).
    """
    logits = _at_least_fp32(logits)
    outside = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    if sampling.is_greedy:
        # vLLM skips temperature (and, in all-greedy batches, top-k/top-p) for greedy requests.
        return logits, outside
    logits = logits / sampling.temperature
    if sampling.top_k <= 0 and sampling.top_p >= 1.0:
        return logits, outside
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    drop_sorted = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if 0 < sampling.top_k < logits.shape[-1]:
        kth_largest = sorted_logits[:, -sampling.top_k].unsqueeze(-1)
        drop_sorted |= sorted_logits < kth_largest
    if sampling.top_p < 1.0:
        cumulative = sorted_logits.masked_fill(drop_sorted, float("-inf")).softmax(-1).cumsum(-1)
        drop_sorted |= cumulative <= 1.0 - sampling.top_p
        drop_sorted[:, -1] = False  # the most likely token always survives
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    if sampled is not None:
        picked = sampled.view(-1, 1)
        outside = drop.gather(-1, picked).squeeze(-1)
        drop.scatter_(-1, picked, False)
    return logits.masked_fill(drop, float("-inf")), outside


def _entropy(logprobs: torch.Tensor) -> torch.Tensor:
    probs = logprobs.exp()
    # Masked tokens have p = 0 and logp = -inf: their 0 * -inf must count as 0.
    return -(probs * logprobs.masked_fill(probs == 0, 0.0)).sum(-1)


def project_to_vocab(model, hidden: torch.Tensor, fp32_lm_head: bool) -> torch.Tensor:
    """The lm_head projection, in fp32 when asked (as the engine's `head_dtype=float32` does)."""
    head = model.get_output_embeddings()
    if fp32_lm_head:
        bias = head.bias if getattr(head, "bias", None) is not None else None
        return F.linear(_at_least_fp32(hidden), _at_least_fp32(head.weight),
                        None if bias is None else _at_least_fp32(bias))
    return head(hidden)


def check_model_supported(model) -> None:
    """Refuse models whose logits go through steps we do not reproduce (soft-capping, scaling)."""
    config = model.config
    text_config = getattr(config, "get_text_config", lambda: config)()
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(text_config, attr, None)
        if value not in (None, 1.0, 0.0):
            raise UserError(
                f"model config sets {attr}={value}; token_logprobs does not reproduce it yet"
            )


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    sampling: SamplingConfig,
    *,
    fp32_lm_head: bool = True,
    logprobs_mode: LogprobsMode = "processed_logprobs",
    with_entropy: bool = True,
    kernels=None,
    routes: torch.Tensor | None = None,
    replay_routes: bool = False,
) -> TokenLogprobs:
    """Logprob (and entropy) of each completion token under `model`, as the engine computes it.

    Args:
        model: a transformers causal LM (anything with `get_decoder()` / `get_output_embeddings()`).
        input_ids: [B, T] prompt + completion tokens, right-padded.
        attention_mask: [B, T] 1 for real tokens.
        completion_mask: [B, T] 1 at completion tokens (the ones whose logprob we want).
        sampling: the sampling parameters the tokens were drawn with.
        fp32_lm_head: project hidden states to logits in float32.
        logprobs_mode: "processed_logprobs" (what the sampler sampled from) or "raw_logprobs"
            (log_softmax of the unprocessed logits, vLLM's default; for diagnosis only).
        kernels: an `EngineKernels` of `model` for bitwise mode (values from the engine's
            kernels; the forward above then runs only when a gradient is needed).
        routes: mixture-of-experts models: the engine's routes [B, T, layers, top_k] (-1 = none),
            compared with the trainer's routing; `replay_routes` routes as the engine did.

    Returns:
        TokenLogprobs with [B, T-1]-shaped tensors aligned to `input_ids[:, 1:]`: entry t is the
        logprob of token t+1 given tokens 0..t.
    """
    check_model_supported(model)
    if logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
        raise UserError(f"unknown logprobs_mode {logprobs_mode!r}")
    targets = input_ids[:, 1:]
    wanted = completion_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    sampled = targets[wanted]
    exact, route_counts = None, None
    if kernels is not None:
        exact, route_counts = _engine_logprobs(kernels, input_ids, attention_mask,
                                               completion_mask, sampling, logprobs_mode, sampled,
                                               routes)
    if exact is None or torch.is_grad_enabled():
        picked, entropy, outside, counted = _model_logprobs(
            model, input_ids, attention_mask, wanted, sampled, sampling, fp32_lm_head,
            logprobs_mode, with_entropy, routes, replay_routes)
        if route_counts is None:  # bitwise: the kernel pass's routing is the one compared
            route_counts = counted
    if exact is not None:
        exact_picked, exact_all = exact
        exact_entropy = _entropy(exact_all) if with_entropy else None
        # The engine's set is the trainer's set here: a sampled token outside it is -inf.
        outside = ~torch.isfinite(exact_picked)
        if torch.is_grad_enabled():
            picked = exact_picked + (picked - picked.detach())
            if with_entropy:
                entropy = exact_entropy + (entropy - entropy.detach())
        else:
            picked, entropy = exact_picked, exact_entropy
    return _aligned(targets, wanted, picked, entropy, outside, route_counts)


def _model_logprobs(model, input_ids, attention_mask, wanted, sampled, sampling, fp32_lm_head,
                    logprobs_mode, with_entropy, routes, replay_routes):
    """The model's own forward: each wanted position's logprob of its sampled token, the
    entropy, which sampled tokens fall outside the kept set, and the routing counts (MoE)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with engine_routing(model, routes, attention_mask, replay_routes) as counted:
        hidden = model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
        ).last_hidden_state
    # Only completion positions are projected: the [N, V] float32 logits are the memory peak.
    logits = project_to_vocab(model, hidden[:, :-1][wanted], fp32_lm_head)
    outside = torch.zeros_like(sampled, dtype=torch.bool)
    if logprobs_mode == "raw_logprobs":
        logprobs_all = _at_least_fp32(logits).log_softmax(-1)
    else:
        processed, outside = process_logits(logits, sampling, sampled)
        logprobs_all = processed.log_softmax(-1)
    picked = logprobs_all.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    entropy = _entropy(logprobs_all) if with_entropy else None
    return picked, entropy, outside, counted[0] if counted else None


def _aligned(targets, wanted, picked, entropy, outside, route_counts) -> TokenLogprobs:
    """The wanted positions' values placed in [B, T-1] tensors aligned with `targets`."""
    out_lp = torch.zeros(targets.shape, dtype=picked.dtype, device=targets.device)
    out_lp[wanted] = picked
    out_ent = torch.zeros_like(out_lp)
    if entropy is not None:
        out_ent[wanted] = entropy.to(out_ent.dtype)
    out_outside = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
    out_outside[wanted] = outside
    return TokenLogprobs(logprobs=out_lp, entropy=out_ent, mask=wanted, outside_nucleus=out_outside,
                         routes=route_counts)


def next_token_logits(model, prompt_ids: list[int], *, fp32_lm_head: bool = True) -> torch.Tensor:
    """The logits [1, V] of the token after `prompt_ids`, projected as `token_logprobs` projects
    them; `next_token_logprobs` processes them (one forward serves several samplings)."""
    check_model_supported(model)
    ids = torch.tensor([prompt_ids])
    hidden = model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 position_ids=torch.arange(len(prompt_ids))[None]
                                 ).last_hidden_state
    return project_to_vocab(model, hidden[:, -1], fp32_lm_head)


def next_token_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The whole processed distribution [V] from `next_token_logits`: the same sampler processing
    as `token_logprobs`, every vocabulary entry instead of one sampled token (masked ones -inf).
    The doctor's sampler check (doctor/sampler.py) tests the engine's draws against it."""
    processed, _ = process_logits(logits, sampling)
    return processed.log_softmax(-1)[0]


def _engine_logprobs(kernels, input_ids, attention_mask, completion_mask, sampling,
                     logprobs_mode: LogprobsMode, sampled: torch.Tensor, routes=None):
    """Bitwise mode: ((sampled-token logprobs [N], all logprobs [N, V]) from the engine's kernels,
    in the order of `hidden[:, :-1][wanted]` (row by row, completion tokens in order); the kernel
    pass's routes compared with the engine's `routes` (MoE; else None))."""
    sequences, owners = [], []
    for row, (ids, attn, comp) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(),
                                                completion_mask.tolist())):
        # Each run of sampled tokens is one engine request (an episode's turn): its prompt is
        # everything before it, prefilled afresh (prefix caching is off in bitwise mode).
        runs = _sampled_runs(comp[:sum(attn)])
        sequences += [Sequence(ids[:start], ids[start:end]) for start, end in runs]
        owners += [row] * len(runs)
    logits = kernels.logits(sequences).to(input_ids.device)
    if logprobs_mode == "raw_logprobs":
        logprobs_all = logits.log_softmax(-1, dtype=torch.float32)
    else:
        logprobs_all = processed_logprobs(logits, sampling)
    counts = None
    if routes is not None and kernels.routes is not None:
        counts = _kernel_route_counts(kernels.routes, sequences, owners, routes)
    return (logprobs_all.gather(-1, sampled.unsqueeze(-1)).squeeze(-1), logprobs_all), counts


def _kernel_route_counts(kernel_routes: torch.Tensor, sequences, owners: list[int],
                         routes: torch.Tensor) -> RouteCounts:
    """The kernel pass's expert picks (rows in `_Layout` order: each sequence's prompt, then its
    completion but the last token) against the engine's, per batch row and layer."""
    B, layers = routes.shape[0], routes.shape[2]
    compared = torch.zeros(B, layers, dtype=torch.long)
    differ = torch.zeros(B, layers, dtype=torch.long)
    start = 0
    for seq, owner in zip(sequences, owners):
        n = len(seq.prompt) + len(seq.completion) - 1
        for layer in range(layers):
            mine = kernel_routes[start:start + n, layer]
            if (mine < 0).any():  # a dense layer
                continue
            captured, differs = compare_routes(mine, routes[owner, :n, layer].cpu())
            compared[owner, layer] += int(captured.sum())
            differ[owner, layer] += int(differs.sum())
        start += n
    return RouteCounts(compared, differ)


def _sampled_runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of 1s in a completion mask: the turns of an episode."""
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs
