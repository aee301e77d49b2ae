"""LoRA adapters on the trainer side: the base weights frozen, a low-rank update on chosen linears.

    y = W x + (x Aᵀ)(s B)ᵀ,   s = alpha / r   (alpha / √r with rslora)

Each adapted `nn.Linear` keeps its own weight and gains two children, `lora_A` [r, in] and
`lora_B` [out, r], plus a forward hook that adds the update. The parameter names are therefore
PEFT's (`model.layers.0.self_attn.q_proj.lora_A.weight`, saved under `base_model.model.`), the
base names do not change, and `token_logprobs` — the one logprob function — sees an ordinary
transformers model. The scale is folded into B before the second product, in the order vLLM's
CPU LoRA ops use (vllm/lora/lora_weights.py `optimize`, then shrink and expand), so that both
sides round alike.

The engine side loads the same tensors from a PEFT folder (weights/lora_folder.py, the adapter's
transport); `engine_digests` predicts the bytes the engine's adapter slots hold after loading
(rank padded to `max_lora_rank`, B scaled, the engine's dtype), which the worker digests
(engine/worker_extension.py `parityrl_adapter_digests`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from parityrl.core.errors import UserError
from parityrl.weights.lora_folder import lora_scale

ALL_LINEAR = "all-linear"


def _add_update(linear: nn.Linear, inputs, output):
    """Forward hook of an adapted linear: output + (x Aᵀ)(s B)ᵀ."""
    a, b = linear.lora_A.weight, linear.lora_B.weight
    shrunk = nn.functional.linear(inputs[0].to(a.dtype), a)
    return output + nn.functional.linear(shrunk, b * linear.lora_scale).to(output.dtype)


def target_modules(model, targets: str | list[str]) -> dict[str, nn.Linear]:
    """The decoder's linears to adapt, by full name: every one (`all-linear`, as PEFT: the
    lm_head excluded) or those whose last name component is listed."""
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    found = {f"{prefix}.{name}": m for name, m in decoder.named_modules()
             if isinstance(m, nn.Linear)}
    if targets != ALL_LINEAR:
        found = {n: m for n, m in found.items() if n.rsplit(".", 1)[-1] in targets}
        missing = set(targets) - {n.rsplit(".", 1)[-1] for n in found}
        if missing:
            raise UserError(f"trainer.lora.targets: no linear named {', '.join(sorted(missing))} "
                            f"in the model's decoder")
    if not found:
        raise UserError("trainer.lora: the model's decoder has no linear layers to adapt")
    return found


def attach_lora(model, rank: int, alpha: float, targets: str | list[str] = ALL_LINEAR,
                rslora: bool = False, seed: int = 0, init_b_std: float = 0.0) -> list[str]:
    """Freeze every weight of `model` and give the target linears a trainable adapter in the
    model's dtype. A is initialised as PEFT does (Kaiming-uniform, a = √5), B to zero (the adapted
    model starts as the base one) or, with `init_b_std`, to N(0, std²) — the doctor's random
    non-zero adapter, since a zero B tests nothing. Returns the adapted module names."""
    if rank < 1:
        raise UserError(f"trainer.lora.rank must be >= 1, not {rank}")
    modules = target_modules(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    scale = lora_scale(rank, alpha, rslora)
    for name, linear in modules.items():
        dtype = linear.weight.dtype
        a = torch.empty(rank, linear.in_features)
        bound = 1.0 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=√5) on [r, in]
        a.uniform_(-bound, bound, generator=gen)
        b = (torch.randn(linear.out_features, rank, generator=gen) * init_b_std
             if init_b_std else torch.zeros(linear.out_features, rank))
        linear.lora_A = nn.Linear(linear.in_features, rank, bias=False, dtype=dtype)
        linear.lora_B = nn.Linear(rank, linear.out_features, bias=False, dtype=dtype)
        with torch.no_grad():
            linear.lora_A.weight.copy_(a)
            linear.lora_B.weight.copy_(b)
        linear.lora_scale = scale
        linear.register_forward_hook(_add_update)
    model.parityrl_lora = {"rank": rank, "alpha": alpha, "rslora": rslora,
                           "targets": sorted({n.rsplit(".", 1)[-1] for n in modules})}
    return sorted(modules)


@contextmanager
def adapter_disabled(model):
    """`model` as its base model for the duration (every adapter's scale 0): what an adapter
    changes can be measured, and one that changes nothing (B = 0) shows."""
    adapted = [m for m in model.modules() if hasattr(m, "lora_scale")]
    scales = [m.lora_scale for m in adapted]
    for m in adapted:
        m.lora_scale = 0.0
    try:
        yield model
    finally:
        for m, scale in zip(adapted, scales):
            m.lora_scale = scale


def lora_settings(model) -> dict | None:
    """rank, alpha, rslora and targets of the adapter attached to `model`; None without one."""
    return getattr(model, "parityrl_lora", None)


def is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors by their (unprefixed) parameter names, detached."""
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_name(n)}


def lora_rank(tensors: dict[str, torch.Tensor]) -> int | None:
    """The rank of an adapter's tensors (the rows of any A)."""
    return next((t.shape[0] for n, t in tensors.items() if ".lora_A." in n), None)
