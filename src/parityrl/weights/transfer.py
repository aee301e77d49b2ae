"""Trainer state dict → a safetensors file the engine's worker loads in place.

The engine runs in another process; a file in shared memory is the simplest hand-over that works
for every backend and keeps the tensors inspectable. Tensors are cast to the engine's dtype here, so
the digests compare exactly what the engine is asked to hold.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from parityrl.weights.digest import tensor_digest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_update(
    state_dict: dict[str, torch.Tensor], dtype: str, folder: Path, skip: set[str] = frozenset()
) -> tuple[Path, dict[str, str]]:
    """Write `state_dict` (minus `skip`) in `dtype`; return the file and the digests of its tensors."""
    target = _DTYPES[dtype]
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, value in state_dict.items():
        if name in skip:
            continue
        ptr = value.data_ptr()
        if ptr in seen and name.endswith("lm_head.weight"):
            # Tied embeddings: one tensor, stored once under the embedding's name (as HF saves it).
            continue
        seen[ptr] = name
        tensors[name] = value.detach().to(device="cpu", dtype=target).contiguous()
    path = folder / f"update-{uuid.uuid4().hex}.safetensors"
    save_file(tensors, str(path))
    return path, {name: tensor_digest(t) for name, t in tensors.items()}


def checkpoint_tensor_names(model_dir: str | Path) -> set[str]:
    """Names of the tensors in a model folder's safetensors files (headers only)."""
    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names
