"""bfloat16 on a CPU that emulates it: `train` and `doctor` say so in one line at start.

oneDNN and torch take their AVX2 paths when told to (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, read
when the process starts): that is what an AVX2-only CPU runs, on any x86 machine. The processes are
stopped once the line is out, before any engine starts.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

import pytest

from helpers import kill_group, start_train

x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                              reason="the AVX2 paths are x86's")
AVX2_PATHS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_float32_runs_get_no_warning():
    from parityrl.hardware import bfloat16_warning

    assert bfloat16_warning("float32") is None


@x86_only
def test_the_avx2_paths_emulate_bfloat16_and_the_warning_names_the_cost_and_float32():
    code = ("from parityrl.hardware import cpu_bfloat16, bfloat16_warning; import json; "
            "s = cpu_bfloat16(); print(json.dumps([s.slowdown, s.dispatch, "
            "bfloat16_warning('bfloat16')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **AVX2_PATHS}, timeout=120)
    slowdown, dispatch, warning = json.loads(out.stdout.strip().splitlines()[-1])
    assert dispatch == "AVX2" and slowdown > 4, (slowdown, dispatch)  # measured here: 23-36×
    assert warning.startswith("warning: bfloat16 is emulated on this CPU")
    said = re.search(r"took (\d+)× as long as float32", warning)  # its own measurement
    assert said and int(said.group(1)) > 4 and "dtype=float32" in warning, warning


def _first_line_with(proc: subprocess.Popen, stream, needle: str, limit: int = 200) -> str:
    for _ in range(limit):
        line = stream.readline()
        if not line:
            break
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} (exit {proc.poll()})")


@x86_only
def test_train_and_doctor_say_it_at_start(tiny_model, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: bf16\nmodel: {tiny_model}\ndtype: bfloat16\ntensorboard: false\n")
    train = start_train(str(cfg), "--out", str(tmp_path / "run"), env=AVX2_PATHS,
                        stdout=subprocess.PIPE)
    try:
        line = _first_line_with(train, train.stdout, "bfloat16 is emulated")
    finally:
        kill_group(train)
    assert "dtype=float32" in line
    doctor = subprocess.Popen([sys.executable, "-m", "parityrl.cli", "doctor", "--model",
                               tiny_model, "--dtype", "bfloat16"], stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True, start_new_session=True,
                              env={**os.environ, **AVX2_PATHS})
    try:
        line = _first_line_with(doctor, doctor.stderr, "bfloat16 is emulated")
    finally:
        kill_group(doctor)
    assert "--dtype float32" in line
