"""Bitwise mode's cost: one trainer step with the engine's kernels ÷ one default trainer step.

The demo's model shape and batch (64 prompts × 8 samples of "123+4=" with 6 completion tokens),
the real `Trainer` (forward with `token_logprobs`, backward, AdamW step) in float32. Bitwise mode
adds the kernel pass (values) to the ordinary forward and backward (gradient) and re-packs the
GEMM weights after every optimizer step; both are in the timed step. Steps alternate between the
two trainers. Then the doctor's bitwise rung end to end on the same shape (engine start included).
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from parityrl.bench.stats import Summary, ratios
from parityrl.config import load_config
from parityrl.core.rollout import Rollout
from parityrl.doctor.ladder import run_ladder_sync
from parityrl.doctor.rungs import LadderConfig, build_ladder
from parityrl.models.load import load_policy
from parityrl.models.tiny import make_model
from parityrl.models.tokenizer import load_tokenizer
from parityrl.models.warm_start import DEMO_MODEL
from parityrl.trainer.engine_kernels import EngineKernels
from parityrl.trainer.trainer import Trainer


@dataclass
class BitwiseBench:
    prompts: int = 64
    group_size: int = 8
    completion_len: int = 6
    reps: int = 5
    doctor_rung: bool = True  # also time the doctor's bitwise rung (starts an engine)


def _groups(cfg: BitwiseBench, tokenizer, seed: int):
    rng = random.Random(seed)
    groups = []
    for g in range(cfg.prompts):
        prompt = tokenizer.encode(f"{rng.randint(100, 999)}+{rng.randint(0, 9)}=")
        group = []
        for _ in range(cfg.group_size):
            completion = tokenizer.encode(str(rng.randint(100, 1008)))[:cfg.completion_len - 1]
            completion.append(tokenizer.eos_token_id)
            group.append(Rollout(prompt, completion, [-0.5] * len(completion),
                                 [0] * len(completion), "stop", g, reward=float(rng.random() < 0.4)))
        groups.append(group)
    return groups


def run(cfg: BitwiseBench, say=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="parityrl-bench-") as tmp:
        folder = make_model(Path(tmp) / "m", **DEMO_MODEL)
        tokenizer = load_tokenizer(folder)
        trainers = {}
        for mode in ("default", "bitwise"):
            run_cfg = load_config(None, [f"model={folder}", f"parity.mode={mode}",
                                         "sampling.temperature=1.0"])
            trainer = Trainer(run_cfg, load_policy(folder, "float32"), tokenizer.pad_token_id)
            if mode == "bitwise":  # what use_engine_kernels sets up once a run's engine is up
                trainer.kernels = EngineKernels(trainer.model)
            trainers[mode] = trainer
        say(f"bitwise: trainer step, {cfg.prompts}×{cfg.group_size} rollouts, demo model shape")

        def step(mode: str, rep: int) -> float:
            groups = _groups(cfg, tokenizer, seed=rep)
            trainer = trainers[mode]
            start = time.perf_counter()
            trainer.apply(trainer.accumulate(groups))
            return time.perf_counter() - start

        step("default", -1), step("bitwise", -1)  # warm-up
        seconds = {"default": [], "bitwise": []}
        for rep in range(cfg.reps):
            order = ("default", "bitwise") if rep % 2 == 0 else ("bitwise", "default")
            for mode in order:
                seconds[mode].append(step(mode, rep))
        ratio = ratios(seconds["bitwise"], seconds["default"])
        say(f"  step: default {Summary.of(seconds['default']).median:.3f} s, bitwise "
            f"{Summary.of(seconds['bitwise']).median:.3f} s ({ratio.median:.2f}×)")
        rung_seconds = _doctor_rung_seconds(str(folder), say) if cfg.doctor_rung else None
    return {"bitwise_step_cost_ratio": ratio.as_dict(),
            "step_seconds": {m: Summary.of(s).as_dict() for m, s in seconds.items()},
            "doctor_bitwise_rung_seconds": rung_seconds,
            "setup": {**cfg.__dict__, "model_shape": DEMO_MODEL}}


def _doctor_rung_seconds(model: str, say) -> float:
    start = time.perf_counter()
    results, _ = run_ladder_sync(LadderConfig(model=model),
                                 rungs=build_ladder(bitwise=True)[-1:])
    seconds = time.perf_counter() - start
    equal = all(d == 0 for r in results for d in r.abs_diffs)
    say(f"  doctor bitwise rung: {seconds:.1f} s (engine start included), every token equal: "
        f"{equal}")
    if not equal:
        raise RuntimeError("the doctor's bitwise rung found tokens that differ")
    return seconds
