"""Pipeline vs conventional RL: the same config and step budget in `mode: async` and `mode: sync`.

Each run's steps after the first (engine warm-up) are cut into equal blocks; a block's samples/s
is its trained samples over its wall time, its engine idle fraction is the time-weighted idle of
its steps (`throughput/engine_idle_frac`: no request in flight). Blocks of the two runs are paired
by position for the ratio, so a slow stretch of the machine shows as spread, not as bias.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from parityrl.bench.stats import Summary, ratios
from parityrl.config import build_config, merge_trees
from parityrl.pipeline import run_training

# The bench's run: the built-in tiny random model (no warm start to build) on the arithmetic task;
# completions run to max_tokens, so every step does comparable work.
PIPELINE_CONFIG = {
    "name": "bench", "seed": 0, "model": "builtin:tiny", "dtype": "float32",
    "sampling": {"temperature": 1.0, "max_tokens": 32},
    "actor": {"group_size": 8, "prompts_per_step": 16, "max_lag": 1},
    "trainer": {"optim": {"lr": 1.0e-4}},
    "tensorboard": False, "checkpoint": {"every": 1000},
}


@dataclass
class PipelineBench:
    steps_per_block: int = 3
    blocks: int = 4
    overrides: dict = field(default_factory=dict)


def _blocks(metrics: list[dict], size: int, count: int) -> list[dict]:
    steps = [m for m in metrics if "time/step_seconds" in m][1:]  # step 1 warms the engine up
    out = []
    for b in range(count):
        chunk = steps[b * size:(b + 1) * size]
        seconds = sum(m["time/step_seconds"] for m in chunk)
        idle = sum(m["throughput/engine_idle_frac"] * m["time/step_seconds"] for m in chunk)
        out.append({"samples_per_s": sum(m["rl/samples"] for m in chunk) / seconds,
                    "engine_idle_frac": idle / seconds})
    return out


def run(cfg: PipelineBench, say=print) -> dict:
    max_steps = 1 + cfg.steps_per_block * cfg.blocks
    per_mode = {}
    with tempfile.TemporaryDirectory(prefix="parityrl-bench-") as tmp:
        for mode in ("async", "sync"):
            tree = merge_trees(PIPELINE_CONFIG, {**cfg.overrides, "mode": mode,
                                                 "max_steps": max_steps})
            say(f"pipeline: mode {mode}, {max_steps} steps")
            run_dir = Path(tmp) / mode
            run_training(build_config(tree), run_dir, on_message=lambda m: None)
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            per_mode[mode] = _blocks([json.loads(x) for x in lines], cfg.steps_per_block,
                                     cfg.blocks)
            say(f"  samples/s {Summary.of([b['samples_per_s'] for b in per_mode[mode]])}, "
                f"engine idle {Summary.of([b['engine_idle_frac'] for b in per_mode[mode]])}")
    rate = {m: [b["samples_per_s"] for b in per_mode[m]] for m in per_mode}
    idle = {m: [b["engine_idle_frac"] for b in per_mode[m]] for m in per_mode}
    return {
        "pipeline_vs_sync_samples_ratio": ratios(rate["async"], rate["sync"]).as_dict(),
        "engine_idle_frac_async": Summary.of(idle["async"]).as_dict(),
        "engine_idle_frac_sync": Summary.of(idle["sync"]).as_dict(),
        "samples_per_s": {m: Summary.of(v).as_dict() for m, v in rate.items()},
        "setup": {"config": merge_trees(PIPELINE_CONFIG, cfg.overrides), "max_steps": max_steps,
                  "steps_per_block": cfg.steps_per_block, "blocks": cfg.blocks},
    }
