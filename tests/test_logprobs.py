"""The trainer-side logprob function against transformers' own warpers and a plain forward."""

import pytest
import torch

from parityrl.errors import UserError
from parityrl.models.load import load_policy
from parityrl.sampling import SamplingConfig
from parityrl.trainer.logprobs import process_logits, token_logprobs

SAMPLINGS = [
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.3, top_k=20),
    SamplingConfig(temperature=0.7, top_p=0.9),
    SamplingConfig(temperature=0.9, top_k=10, top_p=0.8),
    SamplingConfig(temperature=1.0, top_p=0.3),
]


def _hf_processed(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """transformers' warpers in generate()'s order: temperature, top-k, top-p."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    out = TemperatureLogitsWarper(s.temperature)(None, logits.clone())
    if s.top_k:
        out = TopKLogitsWarper(s.top_k)(None, out)
    if s.top_p < 1.0:
        out = TopPLogitsWarper(s.top_p)(None, out)
    return out


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=str)
def test_processing_matches_transformers_warpers(sampling):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 100, generator=gen) * 3
    ours = process_logits(logits, sampling)
    theirs = _hf_processed(logits, sampling)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different kept token sets"
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours.log_softmax(-1)[kept], theirs.log_softmax(-1)[kept],
                               rtol=0, atol=1e-6)
    if sampling.top_k and sampling.top_p == 1.0:
        assert (kept.sum(-1) == sampling.top_k).all()  # random logits: no ties


def test_top_k_keeps_ties_like_vllm():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    out = process_logits(logits, SamplingConfig(top_k=2))
    assert (~torch.isinf(out)).sum().item() == 3  # all three tied maxima survive


def test_greedy_is_plain_log_softmax():
    logits = torch.randn(4, 50)
    assert torch.equal(process_logits(logits, SamplingConfig(temperature=0.0)), logits)


@pytest.fixture(scope="module")
def policy(tiny_model):
    return load_policy(tiny_model, "float32")


def _padded_batch():
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    prompt_len = [3, 1, 2]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    attn = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        comp[i, prompt_len[i] : len(s)] = 1
    return seqs, prompt_len, ids, attn, comp


@pytest.mark.parametrize("sampling", SAMPLINGS[:3], ids=str)
def test_token_logprobs_match_a_plain_forward(policy, sampling):
    seqs, prompt_len, ids, attn, comp = _padded_batch()
    out = token_logprobs(policy, ids, attn, comp, sampling)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            logits = policy(torch.tensor([s])).logits[0, :-1].float()
        ref = _hf_processed(logits, sampling).log_softmax(-1)
        ref = ref.gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1)
        got = out.logprobs[i, : len(s) - 1]
        mask = out.mask[i, : len(s) - 1]
        assert mask.sum().item() == len(s) - prompt_len[i]
        torch.testing.assert_close(got[mask], ref[prompt_len[i] - 1 :], rtol=0, atol=2e-6)
    assert (out.logprobs[~out.mask] == 0).all()


def test_entropy_is_entropy_of_processed_distribution(policy):
    sampling = SamplingConfig(temperature=0.8, top_k=5)
    seqs, _, ids, attn, comp = _padded_batch()
    out = token_logprobs(policy, ids, attn, comp, sampling)
    with torch.no_grad():
        logits = policy(torch.tensor([seqs[0]])).logits[0, :-1]
    p = _hf_processed(logits, sampling).softmax(-1)
    ref = -(p * p.clamp_min(1e-30).log()).sum(-1)
    mask = out.mask[0, : len(seqs[0]) - 1]
    torch.testing.assert_close(out.entropy[0, : len(seqs[0]) - 1][mask], ref[mask], atol=1e-5, rtol=0)
    assert (out.entropy[out.mask] <= torch.log(torch.tensor(5.0)) + 1e-5).all()


def test_gradients_flow_through_token_logprobs(tiny_model):
    model = load_policy(tiny_model, "float32").train()
    _, _, ids, attn, comp = _padded_batch()
    out = token_logprobs(model, ids, attn, comp, SamplingConfig(temperature=0.7, top_p=0.9))
    out.logprobs[out.mask].sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_bfloat16_model_with_fp32_head_projects_in_fp32(tiny_model):
    model = load_policy(tiny_model, "bfloat16")
    _, _, ids, attn, comp = _padded_batch()
    s = SamplingConfig(temperature=0.7)
    fp32 = token_logprobs(model, ids, attn, comp, s, fp32_lm_head=True).logprobs
    bf16 = token_logprobs(model, ids, attn, comp, s, fp32_lm_head=False).logprobs
    assert fp32.dtype == torch.float32
    assert not torch.equal(fp32, bf16)  # the head's precision is visible in the logprobs


def test_unsupported_logit_transforms_are_refused(tiny_model):
    model = load_policy(tiny_model, "float32")
    model.config.final_logit_softcapping = 30.0
    _, _, ids, attn, comp = _padded_batch()
    with pytest.raises(UserError, match="final_logit_softcapping"):
        token_logprobs(model, ids, attn, comp, SamplingConfig())
