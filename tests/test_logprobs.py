"""The trainer-side logprob function against transformers' own warpers and a plain forward."""

import pytest
import torch

from parityrl.core.errors import UserError
from parityrl.models.load import load_policy
from parityrl.core.sampling import SamplingConfig
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
    ours, _ = process_logits(logits, sampling)
    theirs = _hf_processed(logits, sampling)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different kept token sets"
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours.log_softmax(-1)[kept], theirs.log_softmax(-1)[kept],
                               rtol=0, atol=1e-6)
    if sampling.top_k and sampling.top_p == 1.0:
        assert (kept.sum(-1) == sampling.top_k).all()  # random logits: no ties


def test_top_k_keeps_ties_like_vllm():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    out, _ = process_logits(logits, SamplingConfig(top_k=2))
    assert (~torch.isinf(out)).sum().item() == 3  # all three tied maxima survive


def test_greedy_is_plain_log_softmax():
    logits = torch.randn(4, 50)
    assert torch.equal(process_logits(logits, SamplingConfig(temperature=0.0))[0], logits)


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
    with torch.no_grad():  # the model's own float32 noise: the same rows batched vs alone
        batched = policy(ids, attention_mask=attn).logits.float().log_softmax(-1)
        noise = max((batched[i, :len(s)] - policy(torch.tensor([s])).logits[0].float()
                     .log_softmax(-1)).abs().max().item() for i, s in enumerate(seqs))
    for i, s in enumerate(seqs):
        with torch.no_grad():
            logits = policy(torch.tensor([s])).logits[0, :-1].float()
        ref = _hf_processed(logits, sampling).log_softmax(-1)
        ref = ref.gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1)
        got = out.logprobs[i, : len(s) - 1]
        mask = out.mask[i, : len(s) - 1]
        assert mask.sum().item() == len(s) - prompt_len[i]
        ref = ref[prompt_len[i] - 1 :]
        outside = out.outside_nucleus[i, : len(s) - 1][mask]
        # These hand-picked tokens were not sampled: where the warpers mask one, the nucleus
        # rule keeps it (finite) and flags it; everywhere else the values agree.
        assert torch.equal(outside, torch.isinf(ref))
        assert torch.isfinite(got[mask]).all()
        # Batched against one sequence alone: as far apart as the model's own batching noise.
        torch.testing.assert_close(got[mask][~outside], ref[~outside], rtol=0,
                                   atol=max(2e-6, 2 * noise))
    assert (out.logprobs[~out.mask] == 0).all()


def test_entropy_is_entropy_of_processed_distribution(policy):
    sampling = SamplingConfig(temperature=0.8, top_k=5)
    seqs, prompt_len, ids, attn, comp = _padded_batch()
    out = token_logprobs(policy, ids, attn, comp, sampling)
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            logits = policy(torch.tensor([seq])).logits[0, :-1].float() / 0.8
        # The top 5 plus the token that was sampled next (the nucleus rule), by hand.
        kth = logits.topk(5, dim=-1).values[:, -1:]
        keep = logits >= kth
        keep[torch.arange(len(seq) - 1), torch.tensor(seq[1:])] = True
        p = logits.masked_fill(~keep, float("-inf")).softmax(-1)
        ref = -(p * p.clamp_min(1e-30).log()).sum(-1)[prompt_len[i] - 1:]
        got = out.entropy[i, : len(seq) - 1][out.mask[i, : len(seq) - 1]]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (out.entropy[out.mask] <= torch.log(torch.tensor(6.0)) + 1e-5).all()


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


# --- the nucleus rule: the sampled token is always in the trainer's processed distribution ---

def _logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def test_sampled_token_just_outside_the_trainers_nucleus_is_kept():
    # Sorted ascending the mass is 0.05, 0.15, 0.30, 0.50: top-p 0.79 drops the two smallest.
    logits = _logits_of([0.50, 0.30, 0.15, 0.05])
    sampling = SamplingConfig(temperature=1.0, top_p=0.79)
    own, outside = process_logits(logits, sampling)
    assert torch.isinf(own[0, 2]) and torch.isinf(own[0, 3]) and not outside.any()
    # The engine sampled token 2 (its logits put it inside its own nucleus): kept, renormalised
    # over the trainer's set plus that token; token 3 stays out.
    kept, outside = process_logits(logits, sampling, sampled=torch.tensor([2]))
    assert outside.tolist() == [True]
    lp = kept.log_softmax(-1)
    assert torch.isinf(lp[0, 3])
    torch.testing.assert_close(lp[0, 2], torch.tensor(0.15 / 0.95).log(), rtol=0, atol=1e-6)
    torch.testing.assert_close(lp[0, 0], torch.tensor(0.50 / 0.95).log(), rtol=0, atol=1e-6)


def test_sampled_token_inside_the_nucleus_changes_nothing():
    logits = _logits_of([0.50, 0.30, 0.15, 0.05])
    sampling = SamplingConfig(temperature=1.0, top_p=0.79)
    own, _ = process_logits(logits, sampling)
    kept, outside = process_logits(logits, sampling, sampled=torch.tensor([1]))
    assert outside.tolist() == [False]
    assert torch.equal(own, kept)


def test_sampled_token_outside_top_k_is_kept():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    kept, outside = process_logits(logits, SamplingConfig(top_k=2), sampled=torch.tensor([2, 0]))
    assert outside.tolist() == [True, False]
    assert (~torch.isinf(kept[0])).tolist() == [True, True, True, False]
    assert (~torch.isinf(kept[1])).tolist() == [True, True, False, False]
    lp = kept.log_softmax(-1)
    expected = 1.0 - torch.logsumexp(torch.tensor([3.0, 2.0, 1.0]), 0)
    torch.testing.assert_close(lp[0, 2], expected, rtol=0, atol=1e-6)


def test_token_logprobs_never_gives_a_sampled_token_minus_inf(policy):
    # Force every completion token to sit outside a tiny nucleus: top-p 0.01 keeps one token.
    _, _, ids, attn, comp = _padded_batch()
    out = token_logprobs(policy, ids, attn, comp, SamplingConfig(temperature=1.0, top_p=0.01))
    assert torch.isfinite(out.logprobs[out.mask]).all()
    assert torch.isfinite(out.entropy[out.mask]).all()
    # Those tokens that are not the argmax were outside the trainer's own set, and say so.
    with torch.no_grad():
        argmax = policy(ids, attention_mask=attn).logits[:, :-1].argmax(-1)
    not_top = (argmax != ids[:, 1:]) & out.mask
    assert torch.equal(out.outside_nucleus & out.mask, not_top)
    assert (out.logprobs[not_top] < 0).all() and (out.logprobs[out.mask & ~not_top] == 0).all()


def test_mismatch_metrics_count_nonfinite_tokens_and_average_the_rest():
    from parityrl.core.mismatch import mismatch_metrics

    lp_train = torch.tensor([-1.0, float("-inf"), -2.0, float("nan")])
    lp_engine = torch.tensor([-1.5, -0.5, -2.0, -1.0])
    m = mismatch_metrics(lp_train, lp_engine, torch.tensor([False, True, False, False]))
    assert m["mismatch/nonfinite_tokens"] == 2 and m["mismatch/tokens"] == 2
    assert m["mismatch/mean_abs_diff"] == pytest.approx(0.25)
    assert m["mismatch/nucleus_boundary_frac"] == pytest.approx(0.25)
    assert all(v == v and abs(v) != float("inf") for v in m.values())
