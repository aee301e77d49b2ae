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


def test_peer_summary_compares_the_faster_arms_and_reads_phases_against_the_matmul_peak(
        tmp_path):
    """The side-by-side's arithmetic on written timelines: completions/s of each side's faster
    arm, seconds to the best TRL arm's final accuracy, model FLOP/s as a share of the peak."""
    from parityrl.bench.matmul_peak import matmul_peak
    from parityrl.bench.peer import summarize
    from parityrl.bench.peer_arms import WORKLOADS, _core_count

    assert (_core_count("0-1"), _core_count("0,2,5"), _core_count("3")) == (2, 3, 1)
    assert matmul_peak(1, size=128, reps=2) > 0
    spec = WORKLOADS["tiny"]
    stage = {"trl-generate": "generate_and_score", "parityrl-async": "engine_busy"}
    outs, curves = {}, {}
    for arm, step_s, finals in (("trl-generate", 2.0, 0.5), ("parityrl-async", 1.0, 0.6)):
        outs[arm] = tmp_path / arm
        outs[arm].mkdir()
        rows = [{"step": s, "wall_s": s * step_s, "completions": 10, "tokens": 100,
                 "reward_mean": 0.5, "stages": {stage[arm]: step_s / 2, "train": step_s / 2}}
                for s in (1, 2, 3)]
        (outs[arm] / "timeline.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        curves[arm] = [{"step": 0, "wall_s": 0.0, "accuracy": 0.4},
                       {"step": 3, "wall_s": 3 * step_s, "accuracy": finals}]
    physics = {"flops_per_token": 1e9, "prompt_len_mean": 0.0, "cores": 2,
               "peak_gflops": {"1": 50.0, "2": 100.0}}
    infos = {"trl-generate": {}, "parityrl-async": {"cores": {"engine": 1, "trainer": 2}}}
    out = summarize(spec, infos, curves, outs, physics)
    assert out["peer_samples_ratio"] == pytest.approx(2.0)
    assert out["peer_target_accuracy"] == 0.5
    assert out["peer_time_to_accuracy_ratio"] == pytest.approx(3.0 / 6.0)
    ours = out["arms"]["parityrl-async"]["phases"]
    # The steps after the first: 200 tokens × 1 GFLOP in 1 s of generation on one core (peak
    # 50 GFLOP/s), and 3× that work in 1 s of training on two (peak 100).
    assert ours["engine"]["gflops"] == pytest.approx(200.0)
    assert ours["engine"]["fraction_of_peak"] == pytest.approx(4.0)
    assert ours["trainer"]["fraction_of_peak"] == pytest.approx(6.0)
