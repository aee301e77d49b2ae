"""LoRA adapters on the trainer side: the base weights frozen, a low-rank update on chosen linears.

    y = W x + (x Aᵀ)(s B)ᵀ,   s = alpha / r   (alpha / √r with rslora)

Each adapted `nn.Linear` keeps its own weight and gains two children, `lora_A` [r, in] and
`lora_B` [out, r], plus a forward hook that adds the update. The parameter names are therefore
PEFT's (`model.layers.0.self_attn.q_proj.lora_A.weight`, saved under `base_model.model.`), the
base names do not change, and `token_logprobs` — the one logprob function — sees an ordinary
transformers model. The scale is folded into B before the second product, in the order vLLM's
CPU LoRA ops use (vllm/lora/lora_weights.py `optimize`, then shrink and expand), so that both
sides round alike.

The engine side (engine/engine.py `update_adapter`) loads the same tensors from a PEFT folder this
module writes; `engine_digests` predicts the bytes the engine's adapter slots hold after loading
(rank padded to `max_lora_rank`, B scaled, the engine's dtype), which the worker digests
(engine/worker_extension.py `parityrl_adapter_digests`).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from parityrl.errors import UserError

ALL_LINEAR = "all-linear"
PEFT_PREFIX = "base_model.model."
# vLLM 0.32's LoRAConfig.max_lora_rank choices: an adapter's rank is padded up to one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_max_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds a rank-`rank` adapter."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise UserError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank "
                    f"({VLLM_LORA_RANKS[-1]})")


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


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


def peft_config(settings: dict, base_model: str = "") -> dict:
    """adapter_config.json of a PEFT LoRA adapter (read by peft and by vLLM)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings["rank"],
            "lora_alpha": settings["alpha"], "use_rslora": settings["rslora"],
            "target_modules": settings["targets"], "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "modules_to_save": None,
            "base_model_name_or_path": base_model}


def write_peft_folder(folder: str | Path, tensors: dict[str, torch.Tensor], settings: dict,
                      base_model: str = "", dtype: torch.dtype | None = None) -> Path:
    """A PEFT-format adapter folder: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_PREFIX + n: (t if dtype is None else t.to(dtype)).contiguous()
               for n, t in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(peft_config(settings, base_model), indent=2) + "\n")
    return folder


def engine_slots(tensors: dict[str, torch.Tensor], settings: dict, dtype: torch.dtype,
                 max_rank: int) -> dict[str, torch.Tensor]:
    """What the engine's adapter slots hold after loading `tensors`: A and B padded to `max_rank`
    with zeros, in the engine's `dtype`, B times the scale (vLLM multiplies it in after casting).
    The worker digests these bytes; bitwise mode computes with them (trainer/engine_kernels.py)."""
    scale = lora_scale(settings["rank"], settings["alpha"], settings["rslora"])
    slots = {}
    for name, t in tensors.items():
        t = t.detach().to(dtype)
        if ".lora_A." in name:
            slot = torch.zeros(max_rank, t.shape[1], dtype=dtype)
            slot[: t.shape[0]] = t
        else:
            t = t.clone()
            if scale != 1:
                t *= scale
            slot = torch.zeros(t.shape[0], max_rank, dtype=dtype)
            slot[:, : t.shape[1]] = t
        slots[name] = slot
    return slots


def engine_digests(tensors: dict[str, torch.Tensor], settings: dict, dtype: torch.dtype,
                   max_rank: int) -> dict[str, str]:
    """`engine_slots`, digested: what the worker's digests of its slots must equal."""
    from parityrl.weights.digest import tensor_digest

    return {name: tensor_digest(slot)
            for name, slot in engine_slots(tensors, settings, dtype, max_rank).items()}
