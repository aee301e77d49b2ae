"""Numerical checks of the policy losses, corrections, k3 KL and group advantages.

Every expected number is worked out by hand (probabilities chosen so ratios are round numbers);
the functions under test are never re-implemented here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from parityrl.trainer.advantages import AdvantageConfig, group_advantages
from parityrl.trainer.objectives import CorrectionConfig, LossConfig, kl_k3, policy_loss

D = torch.float64


def t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=D)


def logs(*ps) -> torch.Tensor:
    return torch.tensor(ps, dtype=D).log()


def leaf_logs(*ps) -> torch.Tensor:
    return logs(*ps).requires_grad_(True)


def ids(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def run(lp, lp_b, adv, seq_ids, num_seqs, loss=None, corr=None):
    return policy_loss(lp, lp_b, adv, seq_ids, num_seqs,
                       loss or LossConfig(), corr or CorrectionConfig())


def grad_of(lp, out) -> torch.Tensor:
    out.loss.sum().backward()
    return lp.grad


# --------------------------------------------------------------------------------- advantages

def test_mean_baseline_no_std():
    adv = group_advantages(t(1.0, 2.0, 3.0), AdvantageConfig(std_normalize=False))
    # mean 2 → [1-2, 2-2, 3-2]
    assert adv.dtype == torch.float32
    assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]))


def test_mean_baseline_std_normalised_population_std():
    adv = group_advantages(t(1.0, 2.0, 3.0), AdvantageConfig())
    # population var = (1 + 0 + 1) / 3 = 2/3 (the unbiased std would be 1.0)
    std = math.sqrt(2 / 3)
    assert_close(adv, torch.tensor([-1.0 / (std + 1e-6), 0.0, 1.0 / (std + 1e-6)]))
    # sanity: clearly not divided by the unbiased std (1.0)
    assert abs(adv[2].item() - 1.0) > 0.2


def test_mean_baseline_std_binary_rewards():
    adv = group_advantages(t(0.0, 0.0, 1.0, 1.0), AdvantageConfig())
    # mean 0.5, population std 0.5 → ±0.5 / (0.5 + 1e-6)
    a = 0.5 / (0.5 + 1e-6)
    assert_close(adv, torch.tensor([-a, -a, a, a]))


def test_eps_is_added_to_std():
    adv = group_advantages(t(0.0, 0.0, 1.0, 1.0), AdvantageConfig(eps=0.5))
    # ±0.5 / (std 0.5 + eps 0.5) = ±0.5
    assert_close(adv, torch.tensor([-0.5, -0.5, 0.5, 0.5]))


def test_leave_one_out_values():
    adv = group_advantages(t(1.0, 2.0, 3.0),
                           AdvantageConfig(baseline="leave_one_out", std_normalize=False))
    # baselines: (2+3)/2 = 2.5, (1+3)/2 = 2, (1+2)/2 = 1.5
    assert_close(adv, torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5]))


def test_leave_one_out_binary():
    adv = group_advantages(t(0.0, 0.0, 1.0, 1.0),
                           AdvantageConfig(baseline="leave_one_out", std_normalize=False))
    # baselines: 2/3, 2/3, 1/3, 1/3
    assert_close(adv, torch.tensor([-2 / 3, -2 / 3, 1 - 1 / 3, 1 - 1 / 3]))


def test_leave_one_out_std_normalised():
    adv = group_advantages(t(1.0, 2.0, 3.0), AdvantageConfig(baseline="leave_one_out"))
    s = math.sqrt(2 / 3) + 1e-6
    assert_close(adv, torch.tensor([-1.5 / s, 0.0, 1.5 / s]))


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("std_normalize", [False, True])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_identical_rewards_give_zeros(baseline, std_normalize, value):
    # binary / dyadic rewards are exact in floating point: the advantages are exactly 0
    cfg = AdvantageConfig(baseline=baseline, std_normalize=std_normalize)
    adv = group_advantages(torch.full((4,), value, dtype=D), cfg)
    assert torch.equal(adv, torch.zeros(4))


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("std_normalize", [False, True])
def test_identical_non_dyadic_rewards_nearly_zero(baseline, std_normalize):
    cfg = AdvantageConfig(baseline=baseline, std_normalize=std_normalize)
    adv = group_advantages(t(0.7, 0.7, 0.7), cfg)
    assert torch.isfinite(adv).all()
    assert_close(adv, torch.zeros(3), rtol=0, atol=1e-9)


# Regression: with float64 rewards (as the trainer passes them) the mean can be one rounding step
# off r, and the std normalisation used to blow that up to ~1e-10 instead of exact zeros.
@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
def test_identical_rewards_exact_zero_float64(baseline):
    adv = group_advantages(t(0.7, 0.7, 0.7), AdvantageConfig(baseline=baseline))
    assert torch.equal(adv, torch.zeros(3))


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("std_normalize", [False, True])
def test_group_of_one(baseline, std_normalize):
    cfg = AdvantageConfig(baseline=baseline, std_normalize=std_normalize)
    adv = group_advantages(t(5.0), cfg)
    assert adv.shape == (1,)
    assert torch.equal(adv, torch.zeros(1))


def test_integer_rewards_accepted():
    adv = group_advantages(torch.tensor([0, 2]), AdvantageConfig(std_normalize=False))
    assert_close(adv, torch.tensor([-1.0, 1.0]))


# ----------------------------------------------------------------------------------------- ppo

def test_ppo_clip_cases_and_gradient():
    # one token per sequence; clip 0.2 → range [0.8, 1.2]
    lp = leaf_logs(0.55, 0.5, 0.3, 0.5, 0.3, 0.5)
    lp_b = logs(0.5, 0.4, 0.5, 0.4, 0.5, 0.4)
    # ratios:     1.1, 1.25, 0.6, 1.25, 0.6, 1.25
    adv = t(2.0, 2.0, -1.0, -1.0, 2.0, 0.0)
    out = run(lp, lp_b, adv, ids(0, 1, 2, 3, 4, 5), 6)

    assert_close(out.ratio, t(1.1, 1.25, 0.6, 1.25, 0.6, 1.25))
    expected_loss = t(
        -(1.1 * 2.0),   # inside the range: -ratio·A
        -(1.2 * 2.0),   # 1.25 > 1.2, A > 0: clipped → -(1.2·A)
        -(0.8 * -1.0),  # 0.6 < 0.8, A < 0: min(-0.6, -0.8) = -0.8 → clipped, loss 0.8
        -(1.25 * -1.0),  # 1.25 > 1.2, A < 0: min(-1.25, -1.2) = -1.25 unclipped → 1.25
        -(0.6 * 2.0),   # 0.6 < 0.8, A > 0: min(1.2, 1.6) = 1.2 unclipped → -1.2
        0.0,            # A = 0
    )
    assert_close(out.loss, expected_loss)
    assert out.clipped.tolist() == [False, True, True, False, False, False]
    # d(-ratio·A)/d lp = -ratio·A where unclipped; 0 where the bound is taken
    assert_close(grad_of(lp, out), t(-2.2, 0.0, 0.0, 1.25, -1.2, 0.0))
    assert out.is_weight is None and out.truncated is None and out.masked is None


def test_ppo_asymmetric_clip():
    cfg = LossConfig(clip_low=0.1, clip_high=0.3)  # range [0.9, 1.3]
    lp = leaf_logs(0.5, 0.7, 0.34, 0.38)
    lp_b = logs(0.4, 0.5, 0.4, 0.4)
    # ratios:     1.25, 1.4, 0.85, 0.95
    adv = t(2.0, 2.0, -1.0, -1.0)
    out = run(lp, lp_b, adv, ids(0, 1, 2, 3), 4, loss=cfg)
    assert_close(out.ratio, t(1.25, 1.4, 0.85, 0.95))
    assert_close(out.loss, t(
        -2.5,          # 1.25 < 1.3: inside (a symmetric 0.2 clip would have clipped it)
        -(1.3 * 2.0),  # 1.4 > 1.3, A > 0 → clipped at 1.3
        0.9,           # 0.85 < 0.9, A < 0 → -(0.9 · -1)
        0.95,          # 0.95 inside → -(0.95 · -1)
    ))
    assert out.clipped.tolist() == [False, True, True, False]
    assert_close(grad_of(lp, out), t(-2.5, 0.0, 0.0, 0.95))

    # the same first token under the default symmetric clip is clipped
    out_sym = run(logs(0.5), logs(0.4), t(2.0), ids(0), 1)
    assert out_sym.clipped.tolist() == [True]
    assert_close(out_sym.loss, t(-2.4))


def test_ppo_loss_independent_of_segmentation():
    # PPO is per token: regrouping tokens into sequences changes nothing
    lp_b = logs(0.4, 0.5, 0.5)
    adv = t(1.0, 1.0, 1.0)
    a = run(logs(0.5, 0.3, 0.55), lp_b, adv, ids(0, 0, 0), 1)
    b = run(logs(0.5, 0.3, 0.55), lp_b, adv, ids(0, 1, 2), 3)
    # ratios 1.25 (clipped → -1.2), 0.6 (A>0, unclipped → -0.6), 1.1 → -1.1
    assert_close(a.loss, t(-1.2, -0.6, -1.1))
    assert_close(b.loss, a.loss)


# --------------------------------------------------------------------------- on-policy parity

@pytest.mark.parametrize("kind", ["ppo", "gspo"])
def test_on_policy_parity_ratio_exactly_one(kind):
    lp = leaf_logs(0.5, 0.3, 0.9, 0.2, 0.6)
    lp_b = lp.detach().clone()
    adv = t(1.5, 1.5, -0.5, -0.5, 3.0)
    out = run(lp, lp_b, adv, ids(0, 0, 1, 1, 2), 3, loss=LossConfig(type=kind))
    assert torch.equal(out.ratio, torch.ones(5, dtype=D))
    assert not out.clipped.any()
    assert torch.equal(out.loss.detach(), -adv)
    assert torch.equal(grad_of(lp, out), -adv)


def test_on_policy_parity_reinforce():
    lp = leaf_logs(0.5, 0.25)
    adv = t(2.0, -1.0)
    out = run(lp, lp.detach().clone(), adv, ids(0, 1), 2, loss=LossConfig(type="reinforce"))
    assert torch.equal(out.ratio, torch.ones(2, dtype=D))
    assert not out.clipped.any()
    # -1·A·lp
    assert_close(out.loss.detach(), t(-2.0 * math.log(0.5), 1.0 * math.log(0.25)))
    assert torch.equal(grad_of(lp, out), -adv)


def test_parity_with_wider_behaviour_dtype():
    # engine logprobs in float64, trainer in float32: the cast back is exact → ratio 1
    lp = torch.tensor([-0.7, -1.3, -2.1], dtype=torch.float32, requires_grad=True)
    lp_b = lp.detach().double()
    adv = torch.tensor([1.0, 1.0, 1.0])
    out = policy_loss(lp, lp_b, adv, ids(0, 0, 1), 2, LossConfig(), CorrectionConfig())
    assert torch.equal(out.ratio, torch.ones(3))
    assert not out.clipped.any()


# ---------------------------------------------------------------------------------------- gspo

def test_gspo_sequence_ratio_per_sequence_clip_and_gradient():
    gspo = LossConfig(type="gspo")
    lp = leaf_logs(0.605, 0.5, 0.676, 0.4)
    lp_b = logs(0.5, 0.5, 0.4, 0.4)
    # token ratios: 1.21, 1.0 | 1.69, 1.0
    # seq 0: exp(mean(log 1.21, 0)) = sqrt(1.21) = 1.1 → inside [0.8, 1.2]
    # seq 1: sqrt(1.69) = 1.3 > 1.2 with A > 0 → clipped, loss -(1.2·A)
    adv = t(2.0, 2.0, 1.0, 1.0)
    out = run(lp, lp_b, adv, ids(0, 0, 1, 1), 2, loss=gspo)
    assert_close(out.ratio, t(1.1, 1.1, 1.3, 1.3))
    assert_close(out.loss, t(-(1.1 * 2.0), -(1.1 * 2.0), -1.2, -1.2))
    # per sequence: token 0 (ratio 1.21) is NOT clipped, token 3 (ratio 1.0) IS clipped
    assert out.clipped.tolist() == [False, False, True, True]
    # gradient of each token: -(seq ratio)·A when unclipped, 0 when clipped
    assert_close(grad_of(lp, out), t(-2.2, -2.2, 0.0, 0.0))

    # contrast: token-level PPO on the same data clips token 0 and not token 3
    ppo = run(logs(0.605, 0.5, 0.676, 0.4), lp_b, adv, ids(0, 0, 1, 1), 2)
    assert ppo.clipped.tolist() == [True, False, True, False]


def test_gspo_interleaved_sequences_and_negative_advantage():
    gspo = LossConfig(type="gspo")
    # seq 0 = tokens 0, 2; seq 1 = tokens 1, 3
    lp = leaf_logs(0.405, 0.3, 0.5, 0.5)
    lp_b = logs(0.5, 0.4, 0.5, 0.5)
    # seq 0 token ratios 0.81, 1.0 → sqrt(0.81) = 0.9 (inside), A = -1 → loss 0.9
    # seq 1 token ratios 0.75, 1.0 → sqrt(0.75) ≈ 0.866 (inside), A = 4 → loss -4·sqrt(0.75)
    adv = t(-1.0, 4.0, -1.0, 4.0)
    out = run(lp, lp_b, adv, ids(0, 1, 0, 1), 2, loss=gspo)
    s1 = math.sqrt(0.75)
    assert_close(out.ratio, t(0.9, s1, 0.9, s1))
    assert_close(out.loss, t(0.9, -4 * s1, 0.9, -4 * s1))
    assert out.clipped.tolist() == [False, False, False, False]
    # every token of a sequence gets -(seq ratio)·A, whatever its own token ratio
    assert_close(grad_of(lp, out), t(0.9, -4 * s1, 0.9, -4 * s1))


def test_gspo_clipped_below_with_negative_advantage():
    gspo = LossConfig(type="gspo")
    lp = leaf_logs(0.245, 0.5)
    lp_b = logs(0.5, 0.5)
    # token ratios 0.49, 1.0 → seq ratio sqrt(0.49) = 0.7 < 0.8, A < 0 → clipped: -(0.8·-2) = 1.6
    adv = t(-2.0, -2.0)
    out = run(lp, lp_b, adv, ids(0, 0), 1, loss=gspo)
    assert_close(out.ratio, t(0.7, 0.7))
    assert_close(out.loss, t(1.6, 1.6))
    assert out.clipped.tolist() == [True, True]
    assert_close(grad_of(lp, out), t(0.0, 0.0))


# ----------------------------------------------------------------------------------- reinforce

def test_reinforce_truncated_weight_and_gradient():
    cfg = LossConfig(type="reinforce", reinforce_is_cap=2.0)
    lp = leaf_logs(0.5, 0.9, 0.2)
    lp_b = logs(0.4, 0.3, 0.4)
    # ratios 1.25 (< cap), 3.0 (> cap → 2.0), 0.5
    adv = t(2.0, 1.0, -3.0)
    out = run(lp, lp_b, adv, ids(0, 1, 2), 3, loss=cfg)
    assert_close(out.ratio, t(1.25, 3.0, 0.5))
    assert out.clipped.tolist() == [False, True, False]
    assert_close(out.loss, t(
        -1.25 * 2.0 * math.log(0.5),
        -2.0 * 1.0 * math.log(0.9),
        -0.5 * -3.0 * math.log(0.2),
    ))
    # gradient -min(ratio, cap)·A; the weight itself carries no gradient
    assert_close(grad_of(lp, out), t(-2.5, -2.0, 1.5))


# --------------------------------------------------------------------------------- corrections

def test_correction_none_uses_behaviour_logprobs():
    lp = logs(0.5, 0.9)
    lp_b = logs(0.4, 0.3)
    out = run(lp, lp_b, t(1.0, 1.0), ids(0, 1), 2)
    assert_close(out.ratio, t(1.25, 3.0))
    assert out.clipped.tolist() == [True, True]


def test_tis_ppo():
    corr = CorrectionConfig(type="tis", cap=2.0)
    lp = leaf_logs(0.5, 0.9, 0.3)
    lp_b = logs(0.4, 0.3, 0.5)
    # w = 1.25, 3.0 (> cap → 2.0), 0.6; policy ratio against lp.detach() → exactly 1
    adv = t(2.0, 1.0, -1.0)
    out = run(lp, lp_b, adv, ids(0, 1, 2), 3, corr=corr)
    assert torch.equal(out.ratio, torch.ones(3, dtype=D))
    assert not out.clipped.any()  # a w of 3 does not trigger the PPO clip any more
    assert_close(out.is_weight, t(1.25, 2.0, 0.6))
    assert out.truncated.tolist() == [False, True, False]
    assert out.masked is None
    # -(ratio 1 · A) · min(w, cap)
    assert_close(out.loss, t(-2.0 * 1.25, -1.0 * 2.0, 1.0 * 0.6))
    assert_close(grad_of(lp, out), t(-2.5, -2.0, 0.6))


def test_tis_gspo_ratio_one():
    corr = CorrectionConfig(type="tis", cap=2.0)
    lp = leaf_logs(0.605, 0.5)
    lp_b = logs(0.5, 0.5)
    # w = 1.21, 1.0; sequence ratio against lp.detach() = 1
    out = run(lp, lp_b, t(1.0, 1.0), ids(0, 0), 1, loss=LossConfig(type="gspo"), corr=corr)
    assert torch.equal(out.ratio, torch.ones(2, dtype=D))
    assert_close(out.loss, t(-1.21, -1.0))
    assert_close(grad_of(lp, out), t(-1.21, -1.0))


def test_tis_reinforce():
    corr = CorrectionConfig(type="tis", cap=2.0)
    lp = leaf_logs(0.5, 0.9)
    lp_b = logs(0.4, 0.3)
    # ratio 1 → weight 1; loss -A·lp·min(w, cap), w = 1.25, 3 → 2
    adv = t(2.0, 1.0)
    out = run(lp, lp_b, adv, ids(0, 1), 2, loss=LossConfig(type="reinforce"), corr=corr)
    assert torch.equal(out.ratio, torch.ones(2, dtype=D))
    assert not out.clipped.any()
    assert_close(out.loss, t(-2.0 * math.log(0.5) * 1.25, -1.0 * math.log(0.9) * 2.0))
    assert_close(grad_of(lp, out), t(-2.5, -2.0))


def test_mis_token_level():
    corr = CorrectionConfig(type="mis")  # bounds (0.5, 2.0)
    lp = leaf_logs(0.5, 0.9, 0.16, 0.6)
    lp_b = logs(0.4, 0.3, 0.4, 0.5)
    # w = 1.25 keep, 3.0 > 2 drop, 0.4 < 0.5 drop, 1.2 keep
    adv = t(1.0, 1.0, 1.0, -1.0)
    out = run(lp, lp_b, adv, ids(0, 1, 2, 3), 4, corr=corr)
    assert torch.equal(out.ratio, torch.ones(4, dtype=D))
    assert out.masked.tolist() == [False, True, True, False]
    assert_close(out.is_weight, t(1.25, 3.0, 0.4, 1.2))
    # kept tokens keep the plain per-token loss -A; dropped tokens 0
    assert_close(out.loss, t(-1.0, 0.0, 0.0, 1.0))
    assert_close(grad_of(lp, out), t(-1.0, 0.0, 0.0, 1.0))


def test_mis_bounds_inclusive():
    corr = CorrectionConfig(type="mis", low=1.0, high=1.0)
    lp = logs(0.5, 0.5)
    lp_b = logs(0.5, 0.4)
    # w = exp(0) = 1 exactly (kept at the closed bounds), 1.25 dropped
    out = run(lp, lp_b, t(1.0, 1.0), ids(0, 1), 2, corr=corr)
    assert out.masked.tolist() == [False, True]
    assert_close(out.loss, t(-1.0, 0.0))


def test_mis_sequence_level_geometric_mean():
    corr = CorrectionConfig(type="mis", level="sequence")  # bounds (0.5, 2.0)
    lp = leaf_logs(0.9, 0.6, 0.5, 0.08)
    lp_b = logs(0.3, 0.8, 0.5, 0.5)
    # seq 0: w = 3.0, 0.75 → sqrt(2.25) = 1.5 ∈ [0.5, 2] → both kept (token level would drop w=3)
    # seq 1: w = 1.0, 0.16 → sqrt(0.16) = 0.4 < 0.5 → both dropped (token level keeps w=1)
    adv = t(1.0, 1.0, 2.0, 2.0)
    out = run(lp, lp_b, adv, ids(0, 0, 1, 1), 2, corr=corr)
    assert out.masked.tolist() == [False, False, True, True]
    assert_close(out.is_weight, t(3.0, 0.75, 1.0, 0.16))
    assert_close(out.loss, t(-1.0, -1.0, 0.0, 0.0))
    assert_close(grad_of(lp, out), t(-1.0, -1.0, 0.0, 0.0))

    tok = run(logs(0.9, 0.6, 0.5, 0.08), lp_b, adv, ids(0, 0, 1, 1), 2,
              corr=CorrectionConfig(type="mis", level="token"))
    assert tok.masked.tolist() == [True, False, False, True]


def test_icepop_token_level_default_bounds():
    corr = CorrectionConfig(type="icepop")  # bounds (0.5, 5.0)
    lp = leaf_logs(0.9, 0.6, 0.16, 0.5)
    lp_b = logs(0.3, 0.1, 0.4, 0.4)
    # w = 3.0 keep (mis would drop it), 6.0 > 5 drop, 0.4 < 0.5 drop, 1.25 keep
    adv = t(1.0, 1.0, 1.0, 2.0)
    out = run(lp, lp_b, adv, ids(0, 1, 2, 3), 4, corr=corr)
    assert out.masked.tolist() == [False, True, True, False]
    assert_close(out.loss, t(-1.0, 0.0, 0.0, -2.0))
    assert_close(grad_of(lp, out), t(-1.0, 0.0, 0.0, -2.0))


def test_icepop_ignores_sequence_level():
    # icepop is token level even if level="sequence" is set
    corr = CorrectionConfig(type="icepop", level="sequence")
    lp = logs(0.9, 0.05)
    lp_b = logs(0.1, 0.5)
    # w = 9 (drop), 0.1 (drop); the geometric mean sqrt(0.9) would have kept both
    out = run(lp, lp_b, t(1.0, 1.0), ids(0, 0), 1, corr=corr)
    assert out.masked.tolist() == [True, True]
    assert_close(out.loss, t(0.0, 0.0))


def test_correction_bounds():
    assert CorrectionConfig(type="icepop").bounds() == (0.5, 5.0)
    assert CorrectionConfig(type="mis").bounds() == (0.5, 2.0)
    assert CorrectionConfig(type="mis", low=0.8, high=1.5).bounds() == (0.8, 1.5)
    assert CorrectionConfig(type="icepop", high=3.0).bounds() == (0.5, 3.0)


# ---------------------------------------------------------------------------------------- kl

def test_kl_k3_hand_values():
    lp = t(math.log(0.5), math.log(0.5), math.log(0.25))
    lp_ref = t(math.log(0.25), math.log(1.0), math.log(0.5))
    # δ = lp_ref - lp: log 0.5, log 2, log 2 → e^δ - δ - 1
    expected = t(0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1, 2.0 - math.log(2.0) - 1)
    assert_close(kl_k3(lp, lp_ref), expected)
    # The same numbers written out by hand (0.5 + ln 2 - 1, 2 - ln 2 - 1), against the function.
    assert_close(kl_k3(lp, lp_ref), t(0.1931471805599453, 0.3068528194400547, 0.3068528194400547))


def test_kl_k3_zero_when_equal_and_nonnegative():
    lp = t(-0.1, -1.0, -3.0, -7.5)
    assert torch.equal(kl_k3(lp, lp.clone()), torch.zeros(4, dtype=D))
    a = torch.linspace(-6.0, 0.0, 25, dtype=D)
    grid_lp, grid_ref = torch.meshgrid(a, a, indexing="ij")
    k = kl_k3(grid_lp.flatten(), grid_ref.flatten())
    assert (k >= 0).all()
    assert (k[grid_lp.flatten() != grid_ref.flatten()] > 0).all()


def test_kl_k3_gradient():
    # d/d lp (e^{ref-lp} - (ref-lp) - 1) = 1 - e^{ref-lp}; lp=log 0.5, ref=log 0.25 → 1 - 0.5
    lp = leaf_logs(0.5)
    kl_k3(lp, logs(0.25)).sum().backward()
    assert_close(lp.grad, t(0.5))


@pytest.mark.parametrize("how, value, grad", [
    ("token-mean", 2 / 4, [-1 / 4, 1 / 4, 1 / 4, 1 / 4]),
    ("seq-mean-token-mean", 0.0, [-1 / 2, 1 / 6, 1 / 6, 1 / 6]),
    ("seq-mean-token-sum", 2 / (2 * 4), [-1 / 8, 1 / 8, 1 / 8, 1 / 8]),
])
def test_loss_aggregations_weigh_a_short_and_a_long_sequence_as_stated(how, value, grad):
    """Sequences of 1 and 3 tokens, advantages +1 and −1, on-policy PPO: each token's loss is
    −A (ratio 1) and its gradient in lp is −A, times the token's weight: 1/4 each (token-mean),
    1/(2·1) and 1/(2·3) (seq-mean-token-mean: the short sequence's token weighs 3× more),
    1/(2·4) each (seq-mean-token-sum over a constant length of 4)."""
    from parityrl.trainer.objectives import aggregate_loss

    lp = leaf_logs(0.5, 0.25, 0.25, 0.25)
    seq = ids(0, 1, 1, 1)
    per_token = run(lp, lp.detach(), t(1.0, -1.0, -1.0, -1.0), seq, 2).loss
    assert_close(per_token, t(-1.0, 1.0, 1.0, 1.0))
    loss = aggregate_loss(per_token, seq, t(1, 3), how, total_tokens=4, num_seqs=2, length=4)
    loss.backward()
    assert loss.item() == pytest.approx(value, abs=1e-12)
    assert_close(lp.grad, t(*grad))


def test_the_overlong_penalty_falls_linearly_over_the_window_before_the_limit():
    from parityrl.trainer.overlong import OverlongConfig, length_penalty

    cfg = OverlongConfig(mode="shape", window=4, penalty=1.0)
    assert [length_penalty(n, 10, cfg) for n in (1, 6, 7, 8, 10)] == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert length_penalty(8, 10, OverlongConfig(mode="shape", window=4, penalty=0.5)) == -0.25
