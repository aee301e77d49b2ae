"""Built-in model names a config may use instead of a folder: `model: builtin:arithmetic-warm`.

They are built locally on first use (no download) and cached, so the shipped configs run on a fresh
clone. Real users put a Hugging Face model folder in `model:`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from parityrl.errors import UserError

PREFIX = "builtin:"
BUILTINS = {
    "tiny": "a random tiny qwen2 model (parityrl make-model defaults)",
    "arithmetic-warm": "the demo's tiny model after its supervised warm start on arithmetic",
}


def cache_root() -> Path:
    return Path(os.environ.get("PARITYRL_CACHE", Path.home() / ".cache" / "parityrl")) / "models"


def resolve_model(spec: str) -> Path:
    """The folder for `spec`: a path as is, or a built-in name built (once) into the cache."""
    if not spec.startswith(PREFIX):
        return Path(spec)
    name = spec[len(PREFIX):]
    if name not in BUILTINS:
        raise UserError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTINS)}")
    folder = cache_root() / f"{name}-{_recipe_hash(name)}"
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)  # a build that died half-way
    if name == "tiny":
        from parityrl.models.tiny import make_model

        make_model(tmp)
    else:
        from parityrl.demo import build_warm_started_model

        build_warm_started_model(tmp)
    tmp.rename(folder)  # only a finished folder ever carries the name
    return folder


def _recipe_hash(name: str) -> str:
    """Short hash of what a built-in is built from: a changed recipe never reuses a stale cache."""
    import hashlib
    import json

    import parityrl

    recipe: list = [name, parityrl.__version__]
    if name == "arithmetic-warm":
        from parityrl.demo import DEMO_MODEL, DEMO_TASK, WARMUP

        recipe += [DEMO_MODEL, WARMUP, DEMO_TASK]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
