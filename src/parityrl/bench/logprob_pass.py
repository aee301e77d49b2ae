"""Trainer logprob pass: `token_logprobs` against a plain transformers forward + log_softmax.

The same model and batch on both sides. Ours does what the trainer does — fp32 lm_head, the
sampler's processing (temperature), log_softmax, gather, entropy — projecting only completion
positions; the plain pass is `model(...).logits.log_softmax(-1)` gathered at the same tokens. Timed
without gradients (old/reference logprobs, the parity probe) and with a backward pass (the loss).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parityrl.bench.stats import Summary, ratios
from parityrl.core.sampling import SamplingConfig
from parityrl.models.load import load_policy
from parityrl.models.tiny import make_model
from parityrl.trainer.logprobs import token_logprobs


@dataclass
class LogprobBench:
    model_shape: tuple = (("hidden", 512), ("layers", 4), ("heads", 8), ("kv_heads", 4))
    batch: int = 16
    prompt_len: int = 32
    completion_len: int = 96
    temperature: float = 0.7
    reps: int = 5


def _plain(model, ids, attn, completion):
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    lp = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return lp * completion[:, 1:]


def _ours(model, ids, attn, completion, sampling):
    return token_logprobs(model, ids, attn, completion, sampling, fp32_lm_head=True).logprobs


def run(cfg: LogprobBench, say=print) -> dict:
    sampling = SamplingConfig(temperature=cfg.temperature, max_tokens=cfg.completion_len)
    with tempfile.TemporaryDirectory(prefix="parityrl-bench-") as tmp:
        model = load_policy(make_model(Path(tmp) / "m", **dict(cfg.model_shape)), "float32")
    gen = torch.Generator().manual_seed(0)
    T = cfg.prompt_len + cfg.completion_len
    ids = torch.randint(3, model.config.vocab_size, (cfg.batch, T), generator=gen)
    attn = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, cfg.prompt_len:] = 1
    tokens = cfg.batch * cfg.completion_len
    say(f"logprob pass: {cfg.batch}×{T} tokens, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")

    def timed(fn, grad: bool) -> float:
        start = time.perf_counter()
        if grad:
            fn().sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                fn()
        return time.perf_counter() - start

    out = {}
    for grad in (False, True):
        plain_fn = lambda: _plain(model, ids, attn, completion)  # noqa: E731
        ours_fn = lambda: _ours(model, ids, attn, completion, sampling)  # noqa: E731
        timed(plain_fn, grad), timed(ours_fn, grad)  # warm-up
        plain_tps, ours_tps = [], []
        for rep in range(cfg.reps):
            order = (plain_fn, ours_fn) if rep % 2 == 0 else (ours_fn, plain_fn)
            for fn in order:
                (plain_tps if fn is plain_fn else ours_tps).append(tokens / timed(fn, grad))
        key = "with_backward" if grad else "no_grad"
        out[key] = {"ratio": ratios(ours_tps, plain_tps).as_dict(),
                    "ours_tokens_per_s": Summary.of(ours_tps).as_dict(),
                    "plain_tokens_per_s": Summary.of(plain_tps).as_dict()}
        say(f"  {key}: ours {Summary.of(ours_tps).median:.0f} tok/s, "
            f"plain {Summary.of(plain_tps).median:.0f} tok/s")
    return {"logprob_pass_ratio": out["no_grad"]["ratio"], "modes": out,
            "setup": {**cfg.__dict__, "model_shape": dict(cfg.model_shape)}}
