"""`parityrl bench` plumbing: stats, the report, one real stage at a small size. No timing asserted."""

import json

import pytest

from parityrl.bench import bitwise, logprob_pass, report
from parityrl.bench.runner import run_bench
from parityrl.bench.stats import Summary, ratios
from parityrl.core.errors import UserError


def test_summary_and_ratios_of_interleaved_repetitions():
    s = ratios([2.0, 3.0, 4.0], [1.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.0, 2.0, 3.0, 3)
    with pytest.raises(ValueError):
        Summary.of([])


def test_logprob_stage_runs_for_real_and_the_report_quotes_it(tmp_path):
    cfg = logprob_pass.LogprobBench(model_shape=(("hidden", 64), ("layers", 1), ("heads", 2),
                                                 ("kv_heads", 1)), batch=2, prompt_len=4,
                                    completion_len=8, reps=2)
    data = logprob_pass.run(cfg, say=lambda m: None)
    assert data["logprob_pass_ratio"]["n"] == 2
    assert set(data["modes"]) == {"no_grad", "with_backward"}
    for mode in data["modes"].values():
        ours, plain, ratio = mode["ours_tokens_per_s"], mode["plain_tokens_per_s"], mode["ratio"]
        assert ours["n"] == plain["n"] == ratio["n"] == 2
        # The ratio is ours ÷ plain, rep by rep: it lies between the extreme quotients.
        assert ours["min"] / plain["max"] <= ratio["median"] <= ours["max"] / plain["min"]
    assert data["logprob_pass_ratio"] == data["modes"]["no_grad"]["ratio"]
    results = {"command": "parityrl bench --only logprob_pass", "machine": report.machine(),
               "stages": {"logprob_pass": data}, "seconds_total": 1.0,
               "logprob_pass_ratio": data["logprob_pass_ratio"]}
    md = report.write(results, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["logprob_pass_ratio"]["n"] == 2
    text = md.read_text()
    assert "`logprob_pass_ratio`" in text and "parityrl bench --only logprob_pass" in text


def test_unknown_stage_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown bench stage"):
        run_bench(tmp_path / "r.json", only=["rollouts"])
    assert not (tmp_path / "r.json").exists()


def test_bitwise_stage_times_both_trainers_on_the_same_batches():
    data = bitwise.run(bitwise.BitwiseBench(prompts=4, group_size=2, reps=2, doctor_rung=False),
                       say=lambda m: None)
    steps, ratio = data["step_seconds"], data["bitwise_step_cost_ratio"]
    assert steps["default"]["n"] == steps["bitwise"]["n"] == ratio["n"] == 2
    assert (steps["bitwise"]["min"] / steps["default"]["max"] <= ratio["median"]
            <= steps["bitwise"]["max"] / steps["default"]["min"])


def test_the_peer_stage_runs_only_when_named_and_needs_trl_in_one_line(tmp_path, monkeypatch):
    """`bench` alone never starts the TRL side-by-side; `--only peer` without the extra is a
    one-line error naming how to install it."""
    import sys

    from parityrl.bench.runner import OPT_IN, STAGES, run_bench
    from parityrl.core.errors import UserError

    assert "peer" in STAGES and "peer" in OPT_IN
    monkeypatch.setitem(sys.modules, "trl", None)  # as if the extra were not installed
    with pytest.raises(UserError, match="PARITYRL_EXTRAS=peer make setup") as caught:
        run_bench(tmp_path / "results.json", ["peer"], say=lambda m: None)
    assert "\n" not in str(caught.value)
