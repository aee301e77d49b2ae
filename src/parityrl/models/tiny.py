"""Build a tiny, complete Hugging Face model folder locally (no download).

    parityrl make-model runs/tiny --arch qwen2 --layers 2 --hidden 64
    parityrl make-model runs/tiny-moe --arch qwen3_moe --experts 8 --experts-per-token 2
    parityrl make-model runs/tiny-moe-shared --arch qwen2_moe    # with a shared expert

The folder holds config.json, model.safetensors and a character-level tokenizer (digits, letters,
punctuation, space, newline, plus <pad>/<bos>/<eos>/<unk>), so both transformers and vLLM load it
like any hub model. The same seed gives byte-identical weights.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Literal

from parityrl.core.errors import UserError
from parityrl.models.tokenizer import CHAR_TOKENIZER_MARK

Arch = Literal["qwen2", "llama", "qwen3_moe", "qwen2_moe"]
ARCHS = ("qwen2", "llama", "qwen3_moe", "qwen2_moe")
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_tokenizer():
    """A character-level fast tokenizer: one token per character, decode = concatenation."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def hf_config(
    arch: Arch, vocab_size: int, *, layers: int, hidden: int, heads: int, kv_heads: int,
    tie_embeddings: bool, max_positions: int, init_std: float, special_ids: dict[str, int],
    experts: int = 8, experts_per_token: int = 2,
):
    from transformers import LlamaConfig, Qwen2Config, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        initializer_range=init_std,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        torch_dtype="float32",
        **special_ids,
    )
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch in ("qwen3_moe", "qwen2_moe") and not 1 <= experts_per_token <= experts:
        raise UserError(f"--experts-per-token must be between 1 and --experts ({experts}), "
                        f"got {experts_per_token}")
    sparse = dict(num_experts=experts, num_experts_per_tok=experts_per_token,
                  moe_intermediate_size=hidden * 2, decoder_sparse_step=1, mlp_only_layers=[],
                  use_sliding_window=False)
    if arch == "qwen3_moe":
        # Every layer sparse: a router picks `experts_per_token` of `experts` MLPs per token, and
        # their gate weights are renormalised over the picked ones (as Qwen3-30B-A3B does).
        return Qwen3MoeConfig(norm_topk_prob=True, head_dim=hidden // heads, **sparse, **common)
    if arch == "qwen2_moe":
        # Qwen1.5-MoE's layout: the routed experts' gate weights are not renormalised, and a
        # shared expert, scaled by a sigmoid gate of its own, sees every token.
        return Qwen2MoeConfig(norm_topk_prob=False, shared_expert_intermediate_size=hidden * 2,
                              **sparse, **common)
    raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def make_model(
    out_dir: str | Path,
    *,
    arch: Arch = "qwen2",
    tie_embeddings: bool = False,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 2,
    kv_heads: int = 1,
    max_positions: int = 512,
    init_std: float = 0.1,
    seed: int = 0,
    experts: int = 8,
    experts_per_token: int = 2,
    head: Literal["causal_lm", "sequence_classification"] = "causal_lm",
) -> Path:
    """Write a random-initialised model folder to `out_dir` and return its path.

    `init_std` is larger than the usual 0.02 so that the random model's next-token distributions are
    peaked like a trained model's, which makes top-k/top-p masks and logprob differences non-trivial.
    `head="sequence_classification"`: a one-label reward model (`*ForSequenceClassification`,
    the score read at the last non-padding token).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if hidden % heads or heads % kv_heads:
        raise UserError(f"hidden ({hidden}) must divide by heads ({heads}), heads by kv_heads")
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = hf_config(
        arch, len(tokenizer), layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
        tie_embeddings=tie_embeddings, max_positions=max_positions, init_std=init_std,
        special_ids=special_ids, experts=experts, experts_per_token=experts_per_token,
    )
    torch.manual_seed(seed)
    if head == "sequence_classification":
        from transformers import AutoModelForSequenceClassification

        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _mark_char_tokenizer(out)
    # An empty generation config: the model itself suggests no sampling defaults.
    (out / "generation_config.json").write_text(json.dumps({**special_ids}, indent=2) + "\n")
    return out




def _mark_char_tokenizer(folder: Path) -> None:
    # transformers 5 rebuilds the tokenizer of some model types (qwen2 among them) from the vocab,
    # replacing our per-character pre-tokenizer; the mark tells `load_tokenizer` to load it as is.
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config[CHAR_TOKENIZER_MARK] = True
    path.write_text(json.dumps(config, indent=2) + "\n")
