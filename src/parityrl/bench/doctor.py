"""Doctor runtime: `parityrl doctor` end to end (process start, engines, every rung, report)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(model: str = "builtin:tiny", say=print) -> dict:
    say(f"doctor: parityrl doctor --model {model}")
    with tempfile.TemporaryDirectory(prefix="parityrl-bench-") as tmp:
        command = [sys.executable, "-c", "from parityrl.cli import main; main()", "doctor",
                   "--model", model, "--json", str(Path(tmp) / "doctor.json")]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"doctor failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    say(f"  {seconds:.1f} s, verdict exit code {proc.returncode}")
    return {"doctor_seconds": seconds, "exit_code": proc.returncode,
            "command": " ".join(["parityrl"] + command[3:-2])}
