"""The doctor's sampler check (doctor/sampler.py): the G-test on its own (calibrated on correct
draws, sharp on wrong ones), then on the real engine: a correct setup passes, raw logprobs reported
while the sampler applies temperature and top-p fail as unfaithful, a temperature or a top-p
applied on one side only fails as off-policy; and `parityrl doctor --sampler-draws` says so."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import cli_in_process, engine_running

from parityrl.doctor.sampler import check_sampler, g_test, verdict_lines
from parityrl.engine.settings import EngineSettings
from parityrl.models.load import load_policy
from parityrl.core.sampling import SamplingConfig

SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=1)
PROMPTS = [[5, 6, 76, 7, 84], [20, 21, 22], [40, 41, 42, 43, 98]]
DRAWS = 2000


def _distribution(size: int = 40, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(size, generator=gen, dtype=torch.float64) * 1.5).softmax(-1)


def _draw(p: torch.Tensor, draws: int, seed: int) -> dict[int, int]:
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.multinomial(p.float(), draws, replacement=True, generator=gen)
    return {int(t): int(c) for t, c in zip(*torch.unique(drawn, return_counts=True))}


def test_on_correct_draws_the_p_values_are_uniform_so_the_false_alarm_rate_is_the_stated_one():
    p = _distribution()
    full = {t: float(p[t]) for t in range(len(p))}
    p_values = [g_test(_draw(p, DRAWS, seed), full).p_value for seed in range(400)]
    # Uniform p-values: about 5 % below 0.05, about half below 0.5.
    assert 0.02 <= sum(v < 0.05 for v in p_values) / 400 <= 0.09
    assert 0.42 <= sum(v < 0.5 for v in p_values) / 400 <= 0.58
    # As the engine reports: probabilities of the drawn tokens only, the rest pooled.
    counts = _draw(p, DRAWS, 0)
    drawn_only = {t: full[t] for t in counts}
    assert g_test(counts, drawn_only).p_value > 1e-3


def test_draws_from_another_temperature_or_an_impossible_token_fail():
    p = _distribution()
    full = {t: float(p[t]) for t in range(len(p))}
    hotter = (p.log() / 0.7).softmax(-1)
    assert g_test(_draw(hotter, DRAWS, 1), full).p_value < 1e-9
    # A kept set that leaves out a token the sampler draws: G is infinite, p is 0.
    nucleus = {t: v for t, v in full.items() if t != int(p.argmax())}
    total = sum(nucleus.values())
    nucleus = {t: v / total for t, v in nucleus.items()}
    impossible = g_test(_draw(p, DRAWS, 2), nucleus, complete=True)
    assert math.isinf(impossible.g) and impossible.p_value == 0.0


@pytest.fixture(scope="module")
def policy(tiny_model):
    return load_policy(tiny_model, "float32")


def _check(loop, engine, policy, **kwargs):
    return loop.run_until_complete(check_sampler(engine, policy, PROMPTS, SAMPLING, DRAWS,
                                                 seed=0, **kwargs))


@pytest.mark.slow
def test_the_engine_samples_what_it_reports_and_a_one_sided_temperature_is_named(
        tiny_model, policy, loop):
    with engine_running(loop, EngineSettings(model=tiny_model)) as engine:
        results = _check(loop, engine, policy)
        one_sided = _check(loop, engine, policy,
                           trainer_sampling=SAMPLING.model_copy(update={"temperature": 1.0}))
        top_p_one_sided = _check(loop, engine, policy,
                                 trainer_sampling=SAMPLING.model_copy(update={"top_p": 1.0}))
        # Seeded draws: the check is reproducible.
        twice = [loop.run_until_complete(check_sampler(engine, policy, PROMPTS[:2], SAMPLING,
                                                       300, seed=7)) for _ in range(2)]
    assert all(r.passed for r in results), verdict_lines(results)
    assert [(r.engine, r.trainer) for r in twice[0]] == [(r.engine, r.trainer) for r in twice[1]]
    assert all(r.distinct >= 3 for r in results)  # a distribution, not one token
    assert max(r.reported_spread for r in results) <= 1e-5
    assert verdict_lines(results)[0].startswith("PASS (sampler")
    assert all(r.faithful for r in one_sided) and not any(r.on_policy for r in one_sided)
    assert not any(r.passed for r in one_sided)
    lines = verdict_lines(one_sided)
    assert lines[0].startswith("FAIL at the sampler layer")
    assert "trainer's processed distribution" in lines[1]
    # The engine's top-p on the engine's side only: it never draws what the trainer's full
    # distribution expects ~10 % of the time.
    assert all(r.faithful for r in top_p_one_sided)
    assert not any(r.on_policy for r in top_p_one_sided)
    assert verdict_lines(top_p_one_sided)[0].startswith("FAIL at the sampler layer")


@pytest.mark.slow
def test_raw_logprobs_reported_beside_a_processed_sampler_are_unfaithful(tiny_model, policy,
                                                                         loop):
    # vLLM's default logprobs mode, everything else explicit (the doctor's raw rung's engine).
    raw = EngineSettings(model=tiny_model, lm_head_dtype=None, logprobs_mode=None)
    with engine_running(loop, raw) as engine:
        assert engine.resolved_settings()["logprobs_mode"] == "raw_logprobs"
        results = _check(loop, engine, policy)
    assert not any(r.faithful for r in results)
    assert all(r.on_policy for r in results)  # it samples the right distribution
    lines = verdict_lines(results)
    assert lines[0].startswith("FAIL at the sampler layer")
    assert "engine.logprobs_mode" in lines[1]


@pytest.mark.slow
def test_doctor_sampler_draws_reports_the_check_and_its_exit_code(tiny_model, tmp_path):
    out = tmp_path / "d.json"
    proc = cli_in_process("doctor", "--model", tiny_model, "--quick", "--temperature", "0.7",
                          "--top-p", "0.9", "--num-samples", "2", "--max-tokens", "8",
                          "--sampler-draws", "500", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS (sampler, T=0.7, top_p=0.9, top_k=0)" in proc.stdout
    (check,) = json.loads(out.read_text())["sampler"]
    assert check["passed"] is True and len(check["prompts"]) >= 3
    assert all(p["draws"] == 500 and p["engine"]["p_value"] > 0 for p in check["prompts"])


def test_the_precision_tables_ratio_share_counts_tokens_beyond_ln_1_25_either_way():
    import math

    from parityrl.doctor.dtypes import PrecisionRow, table_lines
    from parityrl.doctor.rungs import RungResult

    edge = math.log(1.25)
    diffs = [0.0, 0.1, edge * 0.999, edge * 1.001, 2.0, math.nan]  # 3 of 6 outside [0.8, 1.25]
    metrics = {"mismatch/tokens": 5, "mismatch/mean_abs_diff": 0.4, "mismatch/max_abs_diff": 2.0,
               "mismatch/kl_k3": 0.1}
    result = RungResult("fp32-lm-head", "numerics", SamplingConfig(temperature=0.7), {}, metrics,
                        diffs, list(range(6)), engine_error={"mean": 0.2, "p99": 1.0},
                        trainer_error={"mean": 0.1, "p99": 0.5})
    row = PrecisionRow("bfloat16", result, False, "FAIL: ...")
    assert row.ratio_outside == 0.5 and row.cells()["engine_error_p99"] == 1.0
    assert table_lines([row])[-1] == ("| bfloat16 | 5 | 0.2 / 1 | 0.1 / 0.5 | 0.4 | 2 | 0.1 | "
                                      "50.00% | FAIL |")


@pytest.mark.slow
def test_doctor_compare_dtypes_tabulates_float32_bfloat16_and_float16(tiny_model, tmp_path):
    """The last rung in each dtype on its own engine: every side measured against float64, the
    lower precisions farther from it than float32, and the tiny model's setups all pass."""
    out = tmp_path / "table.json"
    proc = cli_in_process("doctor", "--model", tiny_model, "--compare-dtypes", "--temperature",
                          "0.7", "--top-p", "0.9", "--num-samples", "2", "--max-tokens", "12",
                          "--json", str(out), "--report", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {row["dtype"]: row for row in json.loads(out.read_text())["precision"]}
    assert list(rows) == ["float32", "bfloat16", "float16"]
    assert all(row["passed"] and row["tokens"] > 0 for row in rows.values())
    for low in ("bfloat16", "float16"):
        assert rows[low]["engine_error_mean"] > 10 * rows["float32"]["engine_error_mean"]
        assert rows[low]["mismatch_mean_abs"] > 10 * rows["float32"]["mismatch_mean_abs"]
    assert rows["float32"]["ratio_outside_0.8_1.25"] == 0.0
    assert "bfloat16 against float16: mean |Δ|" in proc.stdout
    table = (tmp_path / "report" / "precision.md").read_text()
    assert table.count("| PASS |") == 3


def test_compare_dtypes_refuses_the_options_it_does_not_run(tiny_model):
    proc = cli_in_process("doctor", "--model", tiny_model, "--compare-dtypes", "--bitwise",
                          "--dtype", "float16")
    assert proc.returncode == 2 and "leave out --bitwise, --dtype" in proc.stdout + proc.stderr


def test_tokens_either_side_of_the_nucleus_cut_are_edge_tokens_by_the_models_dtype():
    """Where rounding can move a token across the top-p cut (as bfloat16 did on the tiny model and
    on SmolLM2), both sides' sets may differ: the tokens ranked where the mass before them is
    within 0.05 of top_p in a 16-bit model, within 1e-3 in float32; top-k: logits within 0.3 (or
    1e-3) of the k-th."""
    from parityrl.doctor.sampler import _edge_tokens

    # Mass before each rank: 0, 0.5, 0.8, 0.89, 0.902, 0.913, 0.923, 0.930, ...
    probs = torch.tensor([0.5, 0.3, 0.09, 0.012, 0.011, 0.01] + [0.077 / 11] * 11,
                         dtype=torch.float64)
    logprobs = probs.log()
    top_p = SamplingConfig(temperature=0.7, top_p=0.9)
    # Token 3 is inside the set (0.89 before it), 4, 5 and the first four of the (tied) tail
    # outside, up to 0.944 before them: all within 0.05 of the cut.
    edge = _edge_tokens(logprobs, top_p, torch.bfloat16)
    assert {3, 4, 5} < edge and len(edge) == 7 and not {0, 1, 2} & edge
    assert _edge_tokens(logprobs, top_p, torch.float32) == set()
    assert _edge_tokens(logprobs, top_p.model_copy(update={"top_p": 0.9025}),
                        torch.float32) == {4}
    assert _edge_tokens(logprobs, top_p.model_copy(update={"top_p": 1.0}),
                        torch.bfloat16) == set()
    top_k = SamplingConfig(temperature=0.7, top_k=2)
    close = torch.tensor([0.0, -1.0, -1.2, -3.0], dtype=torch.float64).log_softmax(-1)
    assert _edge_tokens(close, top_k, torch.bfloat16) == {1, 2}  # the k-th and one 0.2 below
    assert _edge_tokens(close, top_k, torch.float32) == {1}


def test_the_trainers_reference_moves_toward_the_reported_probabilities_only_within_the_band():
    from parityrl.doctor.sampler import _within_band

    trainer = {0: 0.5, 1: 0.3, 2: 0.2}
    reported = {0: 0.55, 1: 0.25}  # token 2 never drawn: the engine reported nothing for it
    assert _within_band(trainer, reported, 0.0) == trainer
    wide = _within_band(trainer, reported, 0.2)  # e^0.2 = 1.22: both within reach
    assert wide == pytest.approx({0: 0.55, 1: 0.25, 2: 0.2})
    narrow = _within_band(trainer, reported, 0.05)  # moved by at most 5 %, then renormalised
    # An engine set holding a token more: its probabilities are 0.9 of the trainer's, same odds.
    assert _within_band(trainer, {0: 0.45, 1: 0.27}, 0.05) == pytest.approx(trainer)
    up, down = 0.5 * math.exp(0.05), 0.3 * math.exp(-0.05)
    total = up + down + 0.2
    assert narrow == pytest.approx({0: up / total, 1: down / total, 2: 0.2 / total})
