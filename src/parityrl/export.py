"""A checkpoint → a Hugging Face model folder that vLLM, transformers and `parityrl doctor` load.

    parityrl export runs/ref out/ref-final              # the run's latest checkpoint
    parityrl export runs/ref/checkpoints/step-000040 out/ref-40

The folder is the run's model folder (config, tokenizer, chat template, generation config) with
the checkpoint's weights in place of the original ones, in the run's dtype, written atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from parityrl.errors import UserError

# Files of the source model folder that describe weights, not the model: never copied.
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".gguf")


def find_checkpoint(source: Path) -> Path:
    from parityrl.trainer.checkpoint import latest_checkpoint

    if (source / "state.json").exists() and (source / "model.safetensors").exists():
        return source
    if (source / "config.yaml").exists():
        found = latest_checkpoint(source)
        if found is None:
            raise UserError(f"{source} has no checkpoint yet")
        return found
    raise UserError(f"{source} is neither a run directory nor a checkpoint folder")


def export_checkpoint(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    from safetensors.torch import load_file, save_file

    from parityrl.config import load_config
    from parityrl.models.builtin import resolve_model
    from parityrl.models.load import check_model_folder

    checkpoint = find_checkpoint(Path(source))
    run_dir = checkpoint.parent.parent
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    cfg = load_config(run_dir / "config.yaml")
    model_dir = check_model_folder(resolve_model(cfg.model))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_FILES) \
                and not item.name.endswith(".index.json"):
            shutil.copy2(item, tmp / item.name)
    # transformers wants safetensors metadata saying the format; the checkpoint has none.
    save_file(load_file(str(checkpoint / "model.safetensors")), str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = cfg.dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    (tmp / "parityrl_export.json").write_text(json.dumps(
        {"run": str(run_dir.resolve()), "checkpoint": checkpoint.name, "step": step,
         "base_model": cfg.model, "dtype": cfg.dtype}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
