import hashlib
from pathlib import Path

import pytest
import torch

from parityrl.models.tiny import CHARACTERS, make_model
from parityrl.models.tokenizer import load_tokenizer


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = make_model(tmp_path / "a", seed=3)
    b = make_model(tmp_path / "b", seed=3)
    c = make_model(tmp_path / "c", seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tie", [False, True])
def test_folder_loads_in_transformers(tmp_path, arch, tie):
    from transformers import AutoModelForCausalLM

    folder = make_model(tmp_path / "m", arch=arch, tie_embeddings=tie, layers=1, hidden=32)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == arch
    assert model.config.tie_word_embeddings is tie
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied is tie
    logits = model(torch.tensor([[1, 5, 6]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)


def test_character_tokenizer_round_trips_every_character(tiny_model):
    tok = load_tokenizer(tiny_model)
    text = CHARACTERS + "12+34=46\nfinal answer: 7"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character, newline and space included
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {0, 1, 2}
