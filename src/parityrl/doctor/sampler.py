"""The doctor's sampler check: does the engine sample from the distribution whose logprobs it
reports, and is that the trainer's?

Every parity number compares the engine's *reported* logprob of a sampled token with the
trainer's. If the sampler draws from another distribution (raw logprobs reported while the sampler
applies temperature and top-p: the seed's bug; a temperature or a top-p applied on one side only),
those numbers can agree while the rollouts are off the policy they are credited to. Here, for each
prompt, the engine draws one token many times (a seed each) with the rung's sampling parameters,
and the counts are tested (G-test) against

- the engine's own reported probabilities of the drawn tokens: is the sampler faithful to what it
  reports? and
- the trainer's processed next-token distribution (trainer/logprobs.py `next_token_logprobs`): is
  it the distribution the trainer credits the tokens to?

Bins: each token expected at least MIN_EXPECTED times has its own; the others share one, whose
probability is the rest of the mass (for the engine, 1 − the reported probabilities of the tokens
with bins of their own: the undrawn tokens' probabilities are never reported). A token drawn that
the trainer gives probability 0 (outside its top-k/top-p set) makes G infinite (the reported TV
is then 1, an upper bound) — unless it sits at the cut of the top-p/top-k set, where the two
sides' rounding decides whether it is kept (the nucleus rule of trainer/logprobs.py; seen in
bfloat16 on the tiny model at top-p 0.9, two near-equal tokens just past the cut, and on SmolLM2,
tokens just inside the trainer's set the engine never drew): the tokens ranked where the mass
before them is within EDGE_MASS of top_p, or with a logit within EDGE_LOGIT of the k-th, on
either side of the cut. Their draws are counted (`edge_draws`) and left out, and the trainer's
test is conditional on the rest of its set, which both sides keep. The two tests of every prompt
share the check's false-alarm rate `alpha` (Bonferroni): a correct setup fails with probability at
most `alpha`. It runs on the ladder's engine after the last rung, like the multi-turn check: no
engine start of its own.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from parityrl.core.sampling import SamplingConfig
from parityrl.trainer.logprobs import next_token_logits, next_token_logprobs

NAME = "sampler"
MIN_EXPECTED = 5.0  # the usual validity floor of the chi-square approximation to G
ALPHA = 1e-3  # the check's false-alarm rate on a correct setup (all its tests together)
# How far the two sides' rounding can move the top-p / top-k cut, per model dtype: in mass before
# a token (top-p) and in temperature-scaled logit (top-k). 16-bit: measured on SmolLM2 in
# bfloat16 at top-p 0.9, the engine's top token had 0.52 where the trainer's had 0.49, which moves
# the cut by ~0.03 (a window of 0.02 let a token just inside the trainer's set, never drawn by the
# engine, fail a correct setup); float32 logprobs differ by ~1e-5.
EDGE_MASS = {torch.float32: 1e-3, torch.bfloat16: 0.05, torch.float16: 0.05}
EDGE_LOGIT = {torch.float32: 1e-3, torch.bfloat16: 0.3, torch.float16: 0.3}


@dataclass
class GTest:
    g: float
    dof: int
    p_value: float
    tv: float  # total variation between the drawn frequencies and the reference, over the bins
    bins: int


def g_test(counts: dict[int, int], reference: dict[int, float], complete: bool = False) -> GTest:
    """Draw counts per token against reference probabilities per token. Tokens absent from
    `reference` share the rest of its mass (1 − sum); with `complete` (the reference names every
    token it gives a probability, as the trainer's does) a drawn token absent from it or at 0 is
    impossible: G is infinite."""
    draws = sum(counts.values())
    if complete and any(reference.get(t, 0.0) <= 0.0 for t in counts):
        return GTest(math.inf, max(1, len(reference) - 1), 0.0, 1.0, len(reference))
    own = {t: p for t, p in reference.items() if p * draws >= MIN_EXPECTED}
    observed = [counts.get(t, 0) for t in own]
    expected = [p * draws for p in own.values()]
    # The pooled bin: every other token, drawn or not.
    observed.append(draws - sum(observed))
    expected.append(max(0.0, 1.0 - sum(own.values())) * draws)
    g = 0.0
    for o, e in zip(observed, expected):
        if o > 0:
            g = math.inf if e <= 0 else g + 2.0 * o * math.log(o / e)
    dof = max(1, sum(1 for e in expected if e > 0) - 1)
    p_value = 0.0 if math.isinf(g) else float(
        torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                torch.tensor(max(g, 0.0) / 2, dtype=torch.float64)))
    tv = 0.5 * sum(abs(o - e) for o, e in zip(observed, expected)) / draws
    return GTest(g, dof, p_value, tv, len(expected))


@dataclass
class SamplerResult:
    prompt: int  # index in the doctor's prompts
    sampling: SamplingConfig
    draws: int
    distinct: int  # distinct tokens drawn
    engine: GTest  # against the engine's reported probabilities
    trainer: GTest  # against the trainer's processed distribution
    alpha: float  # per test
    reported_spread: float  # largest spread of one token's reported logprob across its draws
    edge_draws: int = 0  # draws at the top-p/top-k cut (see the docstring)
    band: float = 0.0  # nats the trainer's probabilities could move (check_sampler)

    @property
    def faithful(self) -> bool:
        return self.engine.p_value >= self.alpha

    @property
    def on_policy(self) -> bool:
        return self.trainer.p_value >= self.alpha

    @property
    def passed(self) -> bool:
        return self.faithful and self.on_policy


async def draw_next_tokens(engine, prompt_ids: list[int], sampling: SamplingConfig, draws: int,
                           seed: int) -> tuple[Counter, dict[int, list[float]]]:
    """`draws` one-token continuations of `prompt_ids`, a seed each: counts per token and the
    logprobs the engine reported for it."""
    one = sampling.model_copy(update={"max_tokens": 1})
    rollouts = await engine.generate_many([prompt_ids], one, n=draws, seed=seed)
    counts: Counter = Counter()
    reported: dict[int, list[float]] = {}
    for r in rollouts:
        token = r.completion_ids[0]
        counts[token] += 1
        reported.setdefault(token, []).append(r.logprobs[0])
    return counts, reported


async def check_sampler(engine, model, prompt_ids: list[list[int]], sampling: SamplingConfig,
                        draws: int, seed: int = 0, *, fp32_lm_head: bool = True,
                        trainer_sampling: SamplingConfig | None = None,
                        alpha: float = ALPHA, band: float = 0.0) -> list[SamplerResult]:
    """Per prompt, `draws` engine draws tested against the engine's reported probabilities and
    the trainer's distribution (under `trainer_sampling`, default `sampling`: a different one is
    how a tests injects a parameter applied on one side only). `band` (nats): the engine/trainer
    logprob mismatch already measured and accepted for this setup (the doctor passes its rung's
    max |Δ|): each drawn token's trainer probability may move toward the engine's reported one
    by that much before the trainer's test (`_within_band`)."""
    per_test = alpha / (2 * len(prompt_ids))
    results = []
    for i, ids in enumerate(prompt_ids):
        counts, reported = await draw_next_tokens(engine, ids, sampling, draws,
                                                  seed + i * draws)
        engine_probs = {t: math.exp(sum(lps) / len(lps)) for t, lps in reported.items()}
        on_trainer = trainer_sampling or sampling
        with torch.no_grad():  # one forward, processed with and without top-k/top-p
            logits = next_token_logits(model, ids, fp32_lm_head=fp32_lm_head)
            trainer_probs = next_token_logprobs(logits, on_trainer).double().exp()
            unmasked = next_token_logprobs(logits, on_trainer.model_copy(
                update={"top_p": 1.0, "top_k": 0})).double()
        edge = _edge_tokens(unmasked, on_trainer, next(model.parameters()).dtype)
        # Conditional on the tokens both sides surely keep: the cut's neighbourhood left out.
        core = [t for t in torch.nonzero(trainer_probs > 0).squeeze(-1).tolist() if t not in edge]
        inside = Counter({t: c for t, c in counts.items() if t not in edge})
        if core and inside:
            mass = float(trainer_probs[core].sum())
            trainer_ref = _within_band({t: float(trainer_probs[t]) / mass for t in core},
                                       engine_probs, band)
            on_policy = g_test(inside, trainer_ref, complete=True)
        else:  # every draw at the cut: nothing left to test
            on_policy = GTest(0.0, 1, 1.0, 0.0, 0)
        spread = max(max(lps) - min(lps) for lps in reported.values())
        results.append(SamplerResult(i, sampling, draws, len(counts),
                                     g_test(counts, engine_probs), on_policy,
                                     per_test, spread, sum(counts[t] for t in edge), band))
    return results


def _within_band(trainer: dict[int, float], reported: dict[int, float],
                 band: float) -> dict[int, float]:
    """The trainer's distribution with each token the engine reported moved toward the engine's
    probability by at most a factor e^band, renormalised. In float32 the band is ~1e-5 and this is
    the trainer's distribution; in 16-bit the two sides' own rounding (~0.3 nats at most on
    SmolLM2 in bfloat16) is otherwise visible to a few hundred draws and would fail every correct
    setup, while a temperature or top-p applied on one side only moves the reported
    probabilities by more than the band on the tokens that matter."""
    shared = [t for t in reported if t in trainer]
    if band <= 0 or not shared:
        return trainer
    # The engine normalises over its own kept set, which may hold a few tokens more or fewer:
    # compare on the trainer's scale (the two sides' mass over the tokens both have).
    scale = sum(reported[t] for t in shared) / sum(trainer[t] for t in shared)
    factor = math.exp(band)
    moved = {t: min(max(reported[t] / scale, p / factor), p * factor) if t in reported else p
             for t, p in trainer.items()}
    total = sum(moved.values())
    return {t: p / total for t, p in moved.items()}


def _edge_tokens(logprobs: torch.Tensor, sampling: SamplingConfig,
                 dtype: torch.dtype) -> set[int]:
    """The tokens on either side of the top-p / top-k cut that rounding could move across it:
    ranked (by the trainer) where the mass before them is within EDGE_MASS of top_p, or with a
    logit within EDGE_LOGIT of the k-th. `logprobs`: the temperature-scaled distribution before
    top-k/top-p."""
    if sampling.is_greedy or (sampling.top_p >= 1.0 and sampling.top_k <= 0):
        return set()
    order = logprobs.argsort(descending=True)
    before = torch.cat([torch.zeros(1, dtype=logprobs.dtype), logprobs[order].exp().cumsum(0)[:-1]])
    near = torch.zeros(len(order), dtype=torch.bool)
    if sampling.top_p < 1.0:
        margin = EDGE_MASS.get(dtype, 0.05)
        near |= (before > sampling.top_p - margin) & (before <= sampling.top_p + margin)
        near[0] = False  # the most likely token is always kept
    if sampling.top_k > 0:
        kth = logprobs[order[min(sampling.top_k, len(order)) - 1]]
        near |= (logprobs[order] - kth).abs() <= EDGE_LOGIT.get(dtype, 0.3)
    return {int(t) for t in order[near]}


def _label(s: SamplingConfig) -> str:
    return f"T={s.temperature:g}, top_p={s.top_p:g}, top_k={s.top_k}"


def verdict_lines(results: list[SamplerResult]) -> list[str]:
    """The check's verdict: PASS, or FAIL at the sampler layer with what failed, and the tests'
    numbers per prompt."""
    first = results[0]
    head = (f"({NAME}, {_label(first.sampling)}): {len(results)} prompts × {first.draws} "
            f"one-token draws, G-tests at a false-alarm rate of {first.alpha * 2 * len(results):g}"
            + (f", the trainer's probabilities within the measured mismatch of {first.band:.3g} "
               "nats" if first.band else ""))
    unfaithful = [r for r in results if not r.faithful]
    off_policy = [r for r in results if not r.on_policy]
    if not unfaithful and not off_policy:
        lines = [f"PASS {head}: the engine samples from the distribution it reports, and it is "
                 "the trainer's."]
    else:
        lines = [f"FAIL at the sampler layer {head}:"]
        if unfaithful:
            lines.append(f"  the engine's draws do not follow the probabilities it reports "
                         f"(prompts {', '.join(str(r.prompt) for r in unfaithful)}): its "
                         "logprobs are not those of the distribution it samples from; check "
                         "engine.logprobs_mode (processed_logprobs).")
        if off_policy:
            lines.append(f"  the engine's draws do not follow the trainer's processed "
                         f"distribution (prompts {', '.join(str(r.prompt) for r in off_policy)}):"
                         " the two sides process logits differently (temperature, top_p, top_k, "
                         "lm_head dtype).")
    for r in results:
        edge = (f"; {r.edge_draws} draws at the top-p/top-k cut, where rounding decides (left "
                "out of the trainer's test)" if r.edge_draws else "")
        lines.append(f"  prompt {r.prompt}: {r.distinct} distinct tokens; engine-reported "
                     f"p = {r.engine.p_value:.3g} (TV {r.engine.tv:.3f}); trainer p = "
                     f"{r.trainer.p_value:.3g} (TV {r.trainer.tv:.3f}){edge}")
    return lines


def to_json(results: list[SamplerResult]) -> dict:
    return {"passed": all(r.passed for r in results),
            "prompts": [{"prompt": r.prompt, "draws": r.draws, "distinct": r.distinct,
                         "alpha_per_test": r.alpha, "reported_spread": r.reported_spread,
                         "edge_draws": r.edge_draws, "band": r.band,
                         "engine": _finite(vars(r.engine)), "trainer": _finite(vars(r.trainer))}
                        for r in results]}


def _finite(test: dict) -> dict:
    """JSON has no infinity: an infinite G (a draw the reference calls impossible) is null."""
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in test.items()}
