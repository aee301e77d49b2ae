"""A checkpoint → a Hugging Face model folder that vLLM, transformers and `parityrl doctor` load.

    parityrl export runs/ref out/ref-final              # the run's latest checkpoint
    parityrl export runs/ref/checkpoints/step-000040 out/ref-40
    parityrl export runs/lora out/adapter               # a LoRA run: a PEFT adapter folder
    parityrl export runs/lora out/merged --merge        # ... or the base with the adapter merged

The folder is the run's model folder (config, tokenizer, chat template, generation config) with
the checkpoint's weights in place of the original ones, in the run's dtype, written atomically.
A LoRA run's checkpoint holds the adapter only: it is exported as a PEFT folder
(adapter_config.json + adapter_model.safetensors, read by peft and by vLLM's `--lora-modules`),
or with `--merge` as a whole model folder with W + s·B·A in every adapted weight (computed in
float32, stored in the run's dtype).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from parityrl.config import load_config
from parityrl.core.errors import UserError
from parityrl.models.builtin import resolve_model
from parityrl.models.load import check_model_folder
from parityrl.trainer.checkpoint import latest_checkpoint
from parityrl.weights.lora_folder import lora_scale, write_peft_folder

# Files of the source model folder that describe weights, not the model: never copied.
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".gguf")


def find_checkpoint(source: Path) -> Path:
    if (source / "state.json").exists() and (source / "model.safetensors").exists():
        return source
    if (source / "config.yaml").exists():
        found = latest_checkpoint(source)
        if found is None:
            raise UserError(f"{source} has no checkpoint yet")
        return found
    raise UserError(f"{source} is neither a run directory nor a checkpoint folder")


def merged_weights(model_dir: Path, adapter: dict, lora: dict, dtype: str) -> dict:
    """The model folder's weights with the adapter merged in: W + s·B·A (float32, then `dtype`)."""
    import torch
    from safetensors.torch import load_file

    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights |= load_file(str(file))
    scale = lora_scale(lora["rank"], lora["alpha"], lora["rslora"])
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        b = adapter[f"{module}.lora_B.weight"]
        base = weights[f"{module}.weight"].float()
        weights[f"{module}.weight"] = base + scale * (b.float() @ a.float())
    return {n: t.to(getattr(torch, dtype)).contiguous() for n, t in weights.items()}


def export_checkpoint(source: str | Path, out: str | Path, overwrite: bool = False,
                      merge: bool = False) -> Path:
    from safetensors.torch import load_file, save_file

    checkpoint = find_checkpoint(Path(source))
    run_dir = checkpoint.parent.parent
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    cfg = load_config(run_dir / "config.yaml")
    model_dir = check_model_folder(resolve_model(cfg.model))
    state = json.loads((checkpoint / "state.json").read_text())
    lora = state.get("extra", {}).get("lora")
    if merge and lora is None:
        raise UserError(f"--merge merges a LoRA adapter; {checkpoint} holds every weight already")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    saved = load_file(str(checkpoint / "model.safetensors"))
    if lora is not None and not merge:
        write_peft_folder(tmp, saved, lora, base_model=str(model_dir))
    else:
        for item in model_dir.iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_FILES) \
                    and not item.name.endswith(".index.json"):
                shutil.copy2(item, tmp / item.name)
        if merge:
            saved = merged_weights(model_dir, saved, lora, cfg.dtype)
        # transformers wants safetensors metadata saying the format; the checkpoint has none.
        save_file(saved, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((tmp / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = cfg.dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "parityrl_export.json").write_text(json.dumps(
        {"run": str(run_dir.resolve()), "checkpoint": checkpoint.name, "step": state["step"],
         "base_model": cfg.model, "dtype": cfg.dtype,
         "lora": lora, "merged": merge}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
