"""The demo's model: a tiny Qwen2 warm-started on 3-digit + 1-digit addition (no download).

What `parityrl demo` trains and what `model: builtin:arithmetic-warm` names;
`builtin:arithmetic-warm-moe` is the same recipe on a tiny Qwen3-MoE (8 experts, top-2). The
supervised warm start stops while the model is only partly competent (about 40% held-out greedy
accuracy), so RL has reward to work with and room to improve.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from parityrl.config import build_config

DEMO_MODEL = dict(arch="qwen2", layers=2, hidden=128, heads=4, kv_heads=2, init_std=0.02)
DEMO_MOE_MODEL = DEMO_MODEL | dict(arch="qwen3_moe", experts=8, experts_per_token=2)
# The built-in names of the warm start, by architecture (models/builtin.py).
WARM_ARCHITECTURES = {"arithmetic-warm": DEMO_MODEL, "arithmetic-warm-moe": DEMO_MOE_MODEL}
WARMUP = dict(steps=1000, batch_size=64, lr=3e-3)
DEMO_TASK = {"type": "arithmetic", "digits": 3, "second_digits": 1, "ops": ["+"],
             "eval_fraction": 0.1, "eval_size": 500}


def build_warm_started_model(out: Path, warmup: dict | None = None, on_step=None,
                             console_print=lambda message: None, architecture: dict = DEMO_MODEL,
                             ) -> tuple[Path, list[float]]:
    """Steps 1 and 2: a tiny model warm-started on the demo task, saved as an HF folder at `out`.

    Deterministic for a given recipe. Also what `model: builtin:arithmetic-warm` (and, with
    `architecture=DEMO_MOE_MODEL`, `builtin:arithmetic-warm-moe`) builds.
    """
    from parityrl.models.load import load_policy
    from parityrl.models.tiny import load_tokenizer, make_model
    from parityrl.tasks.registry import build_task
    from parityrl.trainer.sft import supervised_warmup

    warmup = {**WARMUP, **(warmup or {})}
    init_dir = make_model(out.with_name(out.name + "-init"), seed=0, **architecture)
    console_print(f"1/3 built a tiny {architecture['arch']} model in {init_dir}")
    task = build_task(build_config({"task": DEMO_TASK}).task)
    tokenizer = load_tokenizer(init_dir)
    model = load_policy(init_dir, "float32")
    losses = supervised_warmup(model, tokenizer, task, **warmup, on_step=on_step)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(init_dir / name, out / name)
    shutil.rmtree(init_dir)
    console_print(f"    warm-start loss {losses[0]:.3f} → {losses[-1]:.3f}; saved {out}")
    return out, losses
