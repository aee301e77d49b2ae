"""The LoRA adapter's transport: a PEFT folder the engine loads with vLLM's own `add_lora`, and
the bytes the engine's adapter slots must hold afterwards (rank padded to `max_lora_rank`, B times
the scale, the engine's dtype), which the worker digests (engine/worker_extension.py
`parityrl_adapter_digests`) and bitwise mode computes with (trainer/engine_kernels.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from parityrl.core.errors import UserError
from parityrl.weights.digest import DigestCheck, compare_digests, tensor_digest
from parityrl.weights.update import UpdateTarget

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
    return {name: tensor_digest(slot)
            for name, slot in engine_slots(tensors, settings, dtype, max_rank).items()}


@dataclass
class AdapterPayload:
    """A LoRA adapter: its PEFT-named tensors, rank/alpha/rslora/targets, and the name it is
    loaded under (each version its own: vLLM keys prefix-cache entries by adapter name and path,
    not by weights)."""

    tensors: dict[str, torch.Tensor]
    settings: dict
    name: str
    # Left out of the folder on purpose (tests: the digests catch it).
    skip: frozenset[str] | set[str] = frozenset()


class AdapterTarget(UpdateTarget, Protocol):
    def use_adapter(self, name: str, folder: Path) -> None:
        """Generate with the adapter loaded from `folder` from now on."""
        ...


class AdapterFolderTransport:
    """The adapter's transport (weights/update.py drives it): a PEFT folder in `root`, loaded by
    vLLM's own worker `add_lora` with `load_inplace` into the one slot, which the worker then
    digests; requests in flight continue on the new adapter."""

    writes_ahead = True  # weights/update.py Transport

    def __init__(self, root: Path, base_model: str, dtype: str, max_rank: int) -> None:
        self.root = Path(root)
        self.base_model = base_model
        self.dtype = getattr(torch, dtype)
        self.max_rank = max_rank
        self._name = ""
        self._folder: Path | None = None

    def prepare(self, payload: AdapterPayload) -> dict[str, str]:
        self._name = payload.name
        kept = {n: t for n, t in payload.tensors.items() if n not in payload.skip}
        self._folder = write_peft_folder(self.root / f"adapter-{payload.name}", kept,
                                         payload.settings, base_model=self.base_model,
                                         dtype=self.dtype)
        return engine_digests(payload.tensors, payload.settings, self.dtype, self.max_rank)

    async def load(self, engines) -> list[dict]:
        return [await e.worker_call("parityrl_load_adapter", self._name, 1, str(self._folder))
                for e in engines]

    def check(self, engine, sent: dict[str, str], result: dict) -> DigestCheck:
        check = compare_digests(sent, result["digests"], set(sent))
        # Names the engine holds beyond the trainer's adapter: a stale slot elsewhere.
        check.unexpected = sorted(set(result["nonzero"]) - set(sent))
        return check

    async def loaded(self, engines: list[AdapterTarget]) -> None:
        for engine in engines:
            engine.use_adapter(self._name, self._folder)
