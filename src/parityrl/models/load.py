"""Load a model folder for the trainer side, with the numerics knobs explicit."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from parityrl.errors import UserError

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
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model from {folder}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def checkpoint_state_dict(model, state: dict | None = None) -> dict:
    """The model's tensors (`state`, default its state dict; e.g. gathered from FSDP2 ranks) under
    the names and shapes of its checkpoint files, which is what the engine loads and digests:
    transformers 5 fuses some tensors on load (a mixture-of-experts layer's experts into one 3-D
    tensor per projection) and splits them again on save; this is that split, without the disk.
    Dense models come back unchanged (the same tensors)."""
    from transformers.core_model_loading import revert_weight_conversion

    state = model.state_dict() if state is None else state
    converted = revert_weight_conversion(model, state)
    # Same names: the model's own dict, in its own order (the conversion sorts the names).
    return state if converted.keys() == state.keys() else converted


def to_model_layout(model, tensors: dict) -> dict:
    """Checkpoint-layout `tensors` (`checkpoint_state_dict`'s names and shapes) under `model`'s
    in-memory names: the names as they are when they already match (dense models), else
    converted by transformers' own loader (a mixture-of-experts layer's per-expert tensors fused
    again), through a folder of this model's config and these tensors."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    mine = model.state_dict()
    if set(tensors) <= set(mine):
        return tensors
    with tempfile.TemporaryDirectory(prefix="parityrl-layout-") as folder:
        model.config.save_pretrained(folder)
        save_file({n: t.contiguous() for n, t in tensors.items()}, f"{folder}/model.safetensors",
                  metadata={"format": "pt"})
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=next(iter(mine.values())).dtype)
        converted = loaded.state_dict()
    unknown = set(converted) - set(mine)
    if unknown:
        raise UserError(f"checkpoint tensors do not fit this model: {sorted(unknown)[:3]}")
    return converted


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
