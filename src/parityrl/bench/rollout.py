"""Rollout layer overhead: parityrl's generation path against raw `vllm.LLM.generate`.

Same model, engine settings, prompts and per-request sampling parameters (seeded, so both sides
sample the same tokens). Ours is `RolloutEngine.generate_many` — AsyncLLM streaming, rollout
assembly, per-token version tagging. Both engines stay up and the repetitions alternate between
them, so machine drift hits both sides alike.
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass

from parityrl.bench.stats import Summary, ratios
from parityrl.core.sampling import SamplingConfig
from parityrl.engine.engine import RolloutEngine
from parityrl.engine.settings import EngineSettings
from parityrl.models.builtin import resolve_model
from parityrl.models.tokenizer import load_tokenizer
from parityrl.tasks.arithmetic import ArithmeticConfig, ArithmeticTask


@dataclass
class RolloutBench:
    model: str = "builtin:tiny"
    num_prompts: int = 32
    group_size: int = 8
    max_tokens: int = 64
    temperature: float = 1.0
    reps: int = 5


def run(cfg: RolloutBench, loop: asyncio.AbstractEventLoop, say=print) -> dict:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    folder = str(resolve_model(cfg.model))
    tokenizer = load_tokenizer(folder)
    task = ArithmeticTask(ArithmeticConfig())
    prompts = [tokenizer(task.train_problem(i).prompt, add_special_tokens=False)["input_ids"]
               for i in range(cfg.num_prompts)]
    sampling = SamplingConfig(temperature=cfg.temperature, max_tokens=cfg.max_tokens)
    # The raw LLM runs vLLM's CPU executor (a worker process of its own): ours does too here.
    settings = EngineSettings(model=folder, executor="mp")
    # generate_many gives prompt i the seed base + i * n; the raw side gets the very same params.
    raw_params = [sampling.to_vllm(seed=i * cfg.group_size, n=cfg.group_size)
                  for i in range(cfg.num_prompts)]
    raw_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    say("rollout: starting raw vLLM LLM and parityrl RolloutEngine (same settings)")
    raw = LLM(**settings.engine_kwargs())
    ours = loop.run_until_complete(RolloutEngine.start(settings))
    try:
        def run_raw() -> tuple[float, int]:
            start = time.perf_counter()
            outputs = raw.generate(raw_prompts, raw_params, use_tqdm=False)
            seconds = time.perf_counter() - start
            return seconds, sum(len(c.token_ids) for o in outputs for c in o.outputs)

        def run_ours() -> tuple[float, int]:
            start = time.perf_counter()
            rollouts = loop.run_until_complete(
                ours.generate_many(prompts, sampling, n=cfg.group_size, seed=0))
            seconds = time.perf_counter() - start
            return seconds, sum(r.num_tokens for r in rollouts)

        run_raw(), run_ours()  # warm-up: first batches allocate and compile nothing we time
        raw_tps, ours_tps = [], []
        for rep in range(cfg.reps):
            order = (run_raw, run_ours) if rep % 2 == 0 else (run_ours, run_raw)
            for fn in order:
                seconds, tokens = fn()
                (raw_tps if fn is run_raw else ours_tps).append(tokens / seconds)
            say(f"  rep {rep + 1}/{cfg.reps}: raw {raw_tps[-1]:.0f} tok/s, "
                f"ours {ours_tps[-1]:.0f} tok/s")
    finally:
        loop.run_until_complete(ours.close())
        raw.llm_engine.engine_core.shutdown()
        raw = None  # dropped before gc.collect(); not `del`: run_raw still names it
        gc.collect()  # the next stage should not share the machine with this engine's leftovers
    ratio = ratios(ours_tps, raw_tps)
    return {
        "rollout_overhead_ratio": ratio.as_dict(),
        "raw_tokens_per_s": Summary.of(raw_tps).as_dict(),
        "ours_tokens_per_s": Summary.of(ours_tps).as_dict(),
        "setup": {**cfg.__dict__, "engine": settings.model_dump()},
    }
