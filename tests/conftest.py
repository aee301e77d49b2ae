"""Shared fixtures: tiny model folders built once per session (no downloads)."""

from __future__ import annotations

import os

import pytest

# vLLM's engine process inherits these; set before any test imports vllm.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {
    "qwen2": dict(arch="qwen2", tie_embeddings=False),
    "qwen2-tied": dict(arch="qwen2", tie_embeddings=True),
    "llama": dict(arch="llama", tie_embeddings=False),
    "llama-tied": dict(arch="llama", tie_embeddings=True),
}


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Build (once) and return the folder of a named tiny model variant."""
    from parityrl.models.tiny import make_model

    built: dict[str, str] = {}

    def get(variant: str = "qwen2") -> str:
        if variant not in built:
            folder = tmp_path_factory.mktemp(f"model-{variant}")
            built[variant] = str(make_model(folder, seed=0, **VARIANTS[variant]))
        return built[variant]

    return get


@pytest.fixture(scope="session")
def tiny_model(model_factory) -> str:
    return model_factory("qwen2")
