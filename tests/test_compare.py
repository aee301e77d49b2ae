"""`parityrl compare` on synthetic run directories (edge cases) — real runs are in test_story.py."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from parityrl.compare import compare_runs, write_report
from parityrl.core.errors import UserError


def make_run(path: Path, steps: int, seed: int, shift_at: int | None = None, shift: float = 0.0,
             engine: dict | None = None, drop: set[str] = frozenset(), nan_at: int | None = None,
             partial_line: bool = False) -> Path:
    rng = random.Random(seed)
    path.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        delta = shift if shift_at is not None and step >= shift_at else 0.0
        row = {
            "step": step,
            "rl/reward_mean": 0.2 + 0.004 * step + rng.gauss(0, 0.03) + delta,
            "rl/clip_frac": max(0.0, delta / 10),
            "rl/entropy": 0.6 - 0.002 * step + rng.gauss(0, 0.01),
            "mismatch/kl_k3": 1e-13 * (1 + rng.random()) + delta / 100,
            "rl/samples": 128.0,
        }
        if nan_at == step:
            row["rl/reward_mean"] = None
        for key in drop:
            row.pop(key, None)
        lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n"
    if partial_line:
        text += '{"step": 999, "rl/rew'  # a run being written
    (path / "metrics.jsonl").write_text(text)
    (path / "config.yaml").write_text(yaml.safe_dump({"name": path.name, "seed": seed}))
    (path / "engine_settings.json").write_text(json.dumps(
        {"logprobs_mode": "processed_logprobs", "enable_prefix_caching": False, **(engine or {})}))
    return path


METRICS = ["rl/reward_mean", "rl/clip_frac", "rl/entropy", "mismatch/kl_k3"]


def test_two_seeds_of_the_same_run_track(tmp_path):
    ref = make_run(tmp_path / "ref", 60, seed=1)
    other = make_run(tmp_path / "seed2", 60, seed=2)
    result = compare_runs(ref, [other], metrics=METRICS)
    assert not result.diverged, result.verdict
    assert all(r.diverged_at["seed2"] is None for r in result.results)


def test_a_shift_is_found_at_its_step_on_its_metrics(tmp_path):
    ref = make_run(tmp_path / "ref", 60, seed=1)
    cand = make_run(tmp_path / "cand", 60, seed=2, shift_at=25, shift=0.5,
                    engine={"logprobs_mode": "raw_logprobs"})
    result = compare_runs(ref, [cand], metrics=METRICS)
    at = {r.metric: r.diverged_at["cand"] for r in result.results}
    assert result.diverged
    assert 25 <= at["rl/reward_mean"] <= 28
    assert at["rl/clip_frac"] == 25 and at["mismatch/kl_k3"] == 25
    assert at["rl/entropy"] is None
    assert result.diff == {"engine.logprobs_mode": ["processed_logprobs", "raw_logprobs"],
                           "config.seed": [1, 2]}
    assert "DIVERGES" in result.verdict and "step 25" in result.verdict
    assert "engine.logprobs_mode" in result.verdict


def test_different_lengths_nans_missing_metrics_and_partial_lines(tmp_path):
    ref = make_run(tmp_path / "ref", 50, seed=1, partial_line=True)
    cand = make_run(tmp_path / "cand", 30, seed=2, nan_at=10, drop={"rl/entropy"})
    result = compare_runs(ref, [cand], metrics=METRICS)
    by = {r.metric: r for r in result.results}
    assert by["rl/entropy"].diverged_at["cand"] is None and "no values" in by["rl/entropy"].note
    reward = by["rl/reward_mean"].candidates["cand"]
    assert len(reward) == 50 and reward[9] is None and reward[40] is None
    assert not result.diverged


def test_report_opens_with_the_verdict_and_embeds_plots(tmp_path):
    ref = make_run(tmp_path / "ref", 40, seed=1)
    cand = make_run(tmp_path / "cand", 40, seed=2, shift_at=10, shift=0.5)
    report = write_report(compare_runs(ref, [cand], metrics=METRICS), tmp_path / "out")
    text = report.read_text()
    assert text.startswith("# parityrl compare: DIVERGES\n\n> cand DIVERGES")
    for metric in METRICS:
        png = tmp_path / "out" / (metric.replace("/", "_") + ".png")
        assert png.stat().st_size > 10_000
        assert f"]({png.name})" in text
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["diverged"] is True


@pytest.mark.parametrize("problem", ["missing", "no-overlap", "unknown-metric", "not-a-run"])
def test_bad_input_is_exit_2_with_one_line(tmp_path, problem):
    ref = make_run(tmp_path / "ref", 10, seed=1)
    args = [str(ref), str(make_run(tmp_path / "cand", 10, seed=2))]
    if problem == "missing":
        args[1] = str(tmp_path / "nope")
    elif problem == "no-overlap":
        other = tmp_path / "late"
        make_run(other, 5, seed=3)
        rows = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
        (other / "metrics.jsonl").write_text(
            "".join(json.dumps({**r, "step": r["step"] + 100}) + "\n" for r in rows))
        args[1] = str(other)
    elif problem == "unknown-metric":
        args += ["--metrics", "rl/reward_mean,rl/nope"]
    else:
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    proc = subprocess.run([sys.executable, "-m", "parityrl.cli", "compare", *args, "--gate"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")


def test_gate_exit_codes(tmp_path):
    ref = make_run(tmp_path / "ref", 40, seed=1)
    same = make_run(tmp_path / "same", 40, seed=2)
    bad = make_run(tmp_path / "bad", 40, seed=3, shift_at=5, shift=0.5)
    cmd = [sys.executable, "-m", "parityrl.cli", "compare", "--gate", "--metrics",
           ",".join(METRICS)]
    assert subprocess.run([*cmd, str(ref), str(same)], capture_output=True).returncode == 0
    assert subprocess.run([*cmd, str(ref), str(bad)], capture_output=True).returncode == 1
    with pytest.raises(UserError):
        compare_runs(ref, [bad], metrics=["rl/unknown"])
