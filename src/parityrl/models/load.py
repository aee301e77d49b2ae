"""Load a model folder for the trainer side, with the numerics knobs explicit."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from parityrl.core.errors import UserError
from parityrl.core.hf import BUILDING_MODEL

TORCH_DTYPES = ("float32", "bfloat16", "float16")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_folder(path: str | Path) -> Path:
    """A clear error for a missing folder or one that is not a model, before any heavy import."""
    import json

    folder = Path(path)
    if not folder.exists():
        raise UserError(f"model folder not found: {folder}")
    if not folder.is_dir() or not (folder / "config.json").exists():
        raise UserError(f"not a Hugging Face model folder (no config.json): {folder}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures or not all(str(a).endswith("ForCausalLM") for a in architectures):
        raise UserError(f"{folder}: unsupported architecture {architectures!r}; parityrl trains "
                        "causal language models (architectures ending in ForCausalLM)")
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"model folder has no .safetensors weights: {folder}")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise UserError(f"model folder has no tokenizer ({', '.join(TOKENIZER_FILES)}): {folder}")
    return folder


def load_policy(
    path: str | Path, dtype: str = "float32",
    attn_implementation: Literal["sdpa", "eager"] = "sdpa", device: str = "cpu",
):
    """A transformers causal LM in `dtype`, eval mode, attention implementation stated."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in TORCH_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")
    folder = check_model_folder(path)
    try:
        with BUILDING_MODEL:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
            )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model from {folder}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def has_experts(folder: str | Path) -> bool:
    """A mixture-of-experts model folder (its config.json names a number of experts)."""
    import json

    path = Path(folder) / "config.json"
    if not path.exists():
        return False
    config = json.loads(path.read_text())
    config = config.get("text_config", config)
    return any((config.get(key) or 0) > 0 for key in EXPERT_COUNT_KEYS)
