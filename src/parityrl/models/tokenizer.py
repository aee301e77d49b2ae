"""The tokenizer of any model folder: a hub model's, or the character tokenizer of a tiny one.

    tokenizer = load_tokenizer("runs/tiny")
"""

from __future__ import annotations

import json
from pathlib import Path

CHAR_TOKENIZER_MARK = "parityrl_char_tokenizer"


def load_tokenizer(folder: str | Path):
    """The tokenizer of a model folder: AutoTokenizer, except for our character tokenizer."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    if config_path.exists() and json.loads(config_path.read_text()).get(CHAR_TOKENIZER_MARK):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
