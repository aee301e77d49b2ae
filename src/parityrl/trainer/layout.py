"""The model's tensors in two layouts: the checkpoint files' (what the engine loads and digests) and
transformers' in memory (which fuses some, e.g. a mixture-of-experts layer's experts)."""

from __future__ import annotations

from parityrl.core.errors import UserError
from parityrl.core.hf import BUILDING_MODEL


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
        with BUILDING_MODEL:
            loaded = AutoModelForCausalLM.from_pretrained(folder,
                                                          dtype=next(iter(mine.values())).dtype)
        converted = loaded.state_dict()
    unknown = set(converted) - set(mine)
    if unknown:
        raise UserError(f"checkpoint tensors do not fit this model: {sorted(unknown)[:3]}")
    return converted
