"""The command line as a user meets it: one-line errors with exit 2, and a full doctor run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PARITYRL = [sys.executable, "-m", "parityrl.cli"]


def run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*PARITYRL, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture()
def empty_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n")
    return path


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "/nonexistent/model"], "model folder not found"),
        (["--model", "{empty_dir}"], "not a Hugging Face model folder"),
        (["--model", "{model}", "--dtype", "float8"], "unknown dtype"),
        (["--model", "{model}", "--temperature", "-1"], "temperature must be >= 0"),
        (["--model", "{model}", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--model", "{model}", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--model", "{model}", "--prompts", "{empty_prompts}"], "prompts file is empty"),
        (["--model", "{model}", "--prompts", "/nonexistent.txt"], "prompts file not found"),
        (["--model", "{model}", "--no-such-option"], "No such option"),
    ],
)
def test_doctor_bad_input(tmp_path, tiny_model, empty_prompts, args, fragment):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    args = [a.format(model=tiny_model, empty_dir=empty_dir, empty_prompts=empty_prompts)
            for a in args]
    _assert_one_line_error(run("doctor", *args), fragment)


def test_make_model_unknown_arch(tmp_path):
    _assert_one_line_error(run("make-model", str(tmp_path / "m"), "--arch", "gpt9"), "unknown arch")
    assert not (tmp_path / "m").exists()


def test_help_is_instant():
    proc = run("--help", timeout=20)
    assert proc.returncode == 0 and "doctor" in proc.stdout
    code = "import sys, parityrl.cli; print('vllm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow
def test_doctor_end_to_end_writes_json_and_report(tmp_path, tiny_model):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "12+7="}\n{"prompt": "The quick brown fox"}\n')
    proc = run("doctor", "--model", tiny_model, "--temperature", "0.7", "--num-samples", "3",
               "--max-tokens", "16", "--prompts", str(prompts), "--json",
               str(tmp_path / "d.json"), "--report", str(tmp_path / "report"), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "d.json").read_text())
    assert [r["name"] for r in data["rungs"]] == [
        "engine-defaults", "processed-logprobs", "explicit-runtime", "weight-sync", "fp32-lm-head"]
    for rung in data["rungs"]:
        assert {"mismatch/mean_abs_diff", "mismatch/kl_k3", "mismatch/clip_frac@0.2"} <= set(rung["metrics"])
        assert rung["settings"]["logprobs_mode"] in ("raw_logprobs", "processed_logprobs")
    assert data["passed"] is True
    assert data["rungs"][0]["metrics"]["mismatch/mean_abs_diff"] >= 1e-2
    assert "semantics" in data["verdict"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.startswith("# parityrl doctor: PASS")
    for png in ("abs_diff_hist.png", "abs_diff_by_position.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
    assert "PASS" in proc.stdout
