"""What each lean-step knob saves on the realistic side-by-side's shapes, the trainer alone:

    python -m parityrl.bench.trainer_levers [--rollouts 16] [--zero-groups 1]

SmolLM2-135M-Instruct in float32, synthetic rollouts shaped like the realistic workload's (prompts
of 50 tokens, completions of at most 128: most of them truncated there, the rest 30–127 long),
groups of 8 of which `zero_groups` have equal rewards (advantage exactly 0). One forward and
backward and the optimizer step (`accumulate` + `apply`), timed for each combination of
`trainer.skip_zero_advantage` and `trainer.sort_by_length`, after one untimed warm-up step.
Prints seconds per step as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from parityrl.config import build_config
from parityrl.core.rollout import Rollout
from parityrl.models.builtin import resolve_model
from parityrl.models.policy import build_trainer


def realistic_groups(rollouts: int, zero_groups: int, seed: int = 0) -> list[list[Rollout]]:
    rng = random.Random(seed)
    groups = []
    for g in range(rollouts // 8):
        group = []
        for j in range(8):
            n = 128 if rng.random() < 0.6 else rng.randrange(30, 128)
            r = Rollout([rng.randrange(100, 40000) for _ in range(50)],
                        [rng.randrange(100, 40000) for _ in range(n)], [-1.0] * n, [0] * n,
                        "length", group_id=g)
            # Equal rewards in the first `zero_groups` groups, one correct sample in the others.
            r.reward = 0.0 if g < zero_groups or j else 1.0
            group.append(r)
        groups.append(group)
    return groups


def step_seconds(overrides: dict, groups: list[list[Rollout]], folder: str) -> float:
    cfg = build_config({"model": folder, "dtype": "float32", "sampling": {"temperature": 1.0},
                        "trainer": {"optim": {"tokens_per_microbatch": 2048}, **overrides}})
    trainer = build_trainer(cfg, folder, pad_id=0)
    trainer.apply(trainer.accumulate(groups))  # warm-up: allocations, oneDNN's kernel choice
    start = time.perf_counter()
    trainer.apply(trainer.accumulate(groups))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--zero-groups", type=int, default=1)
    args = parser.parse_args()
    folder = str(resolve_model("builtin:smollm2-135m-instruct"))
    groups = realistic_groups(args.rollouts, args.zero_groups)
    out = {"rollouts": args.rollouts, "zero_advantage_groups": args.zero_groups}
    for skip in (False, True):
        for sort in (False, True):
            key = f"skip_zero_advantage={skip}, sort_by_length={sort}"
            out[key] = step_seconds({"skip_zero_advantage": skip, "sort_by_length": sort},
                                    groups, folder)
            print(key, f"{out[key]:.1f} s", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
