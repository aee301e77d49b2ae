"""Trainer-side checks on CUDA (skipped without a GPU; run on a lent GPU machine)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_trainer_logprobs_and_a_bf16_step_on_cuda(tmp_path, monkeypatch):
    script = Path(__file__).parent.parent / "scripts" / "gpu_trainer_check.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "out.json")])
    runpy.run_path(str(script), run_name="__main__")
    report = json.loads((tmp_path / "out.json").read_text())
    for key, value in report.items():
        if key.startswith(("top_p", "top_k")):
            assert value["finite"], key
            bound = 1e-4 if key.endswith("float32") else 0.5
            assert value["error_vs_float64_mean"] < bound, (key, value)
    step = report["train_step_bfloat16_cuda"]
    assert step["all_finite"] and step["master_weights_float32"] and step["skipped"] == 0
