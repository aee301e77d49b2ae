"""The memory plan against measured peaks: each config trained a few steps as `parityrl train` in a
process of its own, its memory.json read back (predicted parts, VmHWM of the main process and of
the engine core).

    python -m parityrl.bench.memory [--out bench/memory]     # ~15 min on 2 cores

`base` is a run of the built-in tiny model for 2 steps: its peaks less its tiny weights and KV
cache are the process bases (memory_plan.PROCESS_BASE_MB). `refused` must exit 2 before any
engine starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# Prompts that ask for the steps: every completion runs to max_tokens, the case the plan is for
# (with "Reply with just the number." completions stop at 2-16 tokens and a 3-step run never
# meets the largest micro-batch).
LONG = ['task.chat_prompt="What is {a} {op} {b}? Explain your steps, then give the final '
        'answer."']
# name → (config file, overrides); the SmolLM2 runs evaluate nothing (their peaks are training's).
RUNS = {
    "base": ("configs/reference.yaml", ["model=builtin:tiny", "max_steps=2",
                                        "actor.prompts_per_step=2", "engine.kv_cache_gib=0.1"]),
    "tiny (reference.yaml)": ("configs/reference.yaml", ["max_steps=3"]),
    "SmolLM2 full fine-tune (smollm2-chat.yaml, bf16)": (
        "configs/smollm2-chat.yaml", ["max_steps=3", "eval_every=0", *LONG]),
    "SmolLM2 + LoRA, 1024-token micro-batches": (
        "configs/smollm2-lora.yaml", ["max_steps=3", "eval_every=0", *LONG]),
    "SmolLM2 + LoRA, 4096-token micro-batches": (
        "configs/smollm2-lora.yaml", ["max_steps=3", "eval_every=0", *LONG,
                                      "trainer.optim.tokens_per_microbatch=4096"]),
    "refused: SmolLM2 + LoRA, 16384-token micro-batches": (
        "configs/smollm2-lora.yaml", ["max_steps=3", "eval_every=0", "actor.prompts_per_step=32",
                                      "trainer.optim.tokens_per_microbatch=16384"]),
}


def run_one(name: str, config: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cmd = [sys.executable, "-m", "parityrl.cli", "train", config, "--out", str(run_dir),
           "--overwrite", *overrides]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    row = {"config": config, "overrides": overrides, "exit": proc.returncode,
           "seconds": round(time.perf_counter() - began, 1)}
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "memory:"))]
    if errors:
        row["stderr"] = errors[-1]
    memory = run_dir / "memory.json"
    if memory.exists():
        plan = json.loads(memory.read_text())
        row["predicted_mb"] = {"trainer": plan["trainer"]["total"],
                               "engine": plan["engines"][0]["total"]}
        row["parts"] = {"trainer": plan["trainer"], "engine": plan["engines"][0]}
        measured = plan.get("measured_mb") or {}
        row["measured_mb"] = {"trainer": measured.get("trainer"),
                              "engine": (measured.get("engines") or [None])[0]}
    return row


def table(rows: dict) -> str:
    lines = ["| run | process | predicted MB | measured MB | predicted ÷ measured |",
             "|---|---|---|---|---|"]
    for name, row in rows.items():
        if "measured_mb" not in row:
            lines.append(f"| {name} | — | — | — | exit {row['exit']}: {row.get('stderr', '')} |")
            continue
        for process in ("trainer", "engine"):
            p, m = row["predicted_mb"][process], row["measured_mb"][process]
            ratio = f"{p / m:.2f}" if m else "—"
            lines.append(f"| {name} | {process} | {p:.0f} | {m or 0:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else Path(
        "bench/memory")
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "memory.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name, (config, overrides) in RUNS.items():
        if only and not any(o in name for o in only):
            continue
        print(f"memory: {name}", flush=True)
        rows[name] = run_one(name, config, overrides, out)
        results_file.write_text(json.dumps(rows, indent=1))
        print(json.dumps({k: v for k, v in rows[name].items() if k != "parts"}), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
