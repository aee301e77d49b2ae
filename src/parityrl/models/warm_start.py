"""The demo's model: a tiny Qwen2 warm-started on 3-digit + 1-digit addition (no download).

What `parityrl demo` trains and what `model: builtin:arithmetic-warm` names;
`builtin:arithmetic-warm-moe` is the same recipe on a tiny Qwen3-MoE (8 experts, top-2). The
supervised warm start stops once the model is partly competent (35 % held-out greedy accuracy
or a little more, WARMUP), so RL has reward to work with and room to improve.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from parityrl.config import build_config
from parityrl.models.load import load_policy
from parityrl.models.tiny import make_model
from parityrl.models.tokenizer import load_tokenizer
from parityrl.rollouts.evaluate import model_greedy_accuracy
from parityrl.tasks.registry import build_task
from parityrl.trainer.sft import supervised_warmup

DEMO_MODEL = dict(arch="qwen2", layers=2, hidden=128, heads=4, kv_heads=2, init_std=0.02)
DEMO_MOE_MODEL = DEMO_MODEL | dict(arch="qwen3_moe", experts=8, experts_per_token=2)
# The built-in names of the warm start, by architecture (models/builtin.py).
WARM_ARCHITECTURES = {"arithmetic-warm": DEMO_MODEL, "arithmetic-warm-moe": DEMO_MOE_MODEL}
# At least `steps` steps, then on (checked every `check_every`) until the model's greedy accuracy on
# `eval_problems` held-out problems reaches `target_accuracy`, at most `max_steps`. A fixed step
# count is not enough: the loss sits on a plateau until a sudden drop somewhere past step 700, and
# where exactly depends on the processor's float32 kernels (the same 1000 steps gave 40.4 % on an
# Intel Xeon, 7 % with this AMD EPYC's AVX-512 kernels and 35 % with its AVX2 kernels).
WARMUP = dict(steps=1000, batch_size=64, lr=3e-3, target_accuracy=0.35, check_every=100,
              max_steps=4000, eval_problems=200)
ANSWER_TOKENS = 6  # the demo's sampling.max_tokens: three digits and EOS fit
DEMO_TASK = {"type": "arithmetic", "digits": 3, "second_digits": 1, "ops": ["+"],
             "eval_fraction": 0.1, "eval_size": 500}


def build_warm_started_model(out: Path, warmup: dict | None = None, on_step=None,
                             console_print=lambda message: None, architecture: dict = DEMO_MODEL,
                             ) -> tuple[Path, list[float]]:
    """Steps 1 and 2: a tiny model warm-started on the demo task, saved as an HF folder at `out`.

    Deterministic for a given recipe. Also what `model: builtin:arithmetic-warm` (and, with
    `architecture=DEMO_MOE_MODEL`, `builtin:arithmetic-warm-moe`) builds.
    """
    warmup = {**WARMUP, **(warmup or {})}
    init_dir = make_model(out.with_name(out.name + "-init"), seed=0, **architecture)
    console_print(f"1/3 built a tiny {architecture['arch']} model in {init_dir}")
    task = build_task(build_config({"task": DEMO_TASK}).task)
    tokenizer = load_tokenizer(init_dir)
    model = load_policy(init_dir, "float32")
    problems = task.eval_problems()[: warmup["eval_problems"]]
    accuracy: list[float] = []  # at each check

    def done(step: int) -> bool:
        accuracy.append(model_greedy_accuracy(model, tokenizer, task, problems, ANSWER_TOKENS))
        return accuracy[-1] >= warmup["target_accuracy"]

    losses = supervised_warmup(
        model, tokenizer, task, steps=warmup["steps"], batch_size=warmup["batch_size"],
        lr=warmup["lr"], on_step=on_step, check_every=warmup["check_every"],
        max_steps=warmup["max_steps"], done=None if warmup["target_accuracy"] is None else done)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(init_dir / name, out / name)
    shutil.rmtree(init_dir)
    reached = (f", held-out greedy accuracy {accuracy[-1]:.1%} (target "
               f"{warmup['target_accuracy']:.0%})" if accuracy else "")
    console_print(f"    warm-start loss {losses[0]:.3f} → {losses[-1]:.3f} in {len(losses)} steps"
                  f"{reached}; saved {out}")
    return out, losses
