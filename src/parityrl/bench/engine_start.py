"""Engine start: seconds from `RolloutEngine.start` to a ready engine, per executor and per
start method.

`executor: uni` (the default) runs the model in vLLM's engine-core process; `mp` is vLLM's CPU
choice, a worker process of its own (two processes to spawn, each importing vLLM). Starts
alternate between the two, so machine drift hits both alike; each start also checks that the
model runs with the same OpenMP thread count either way.

`start_method: template` (the default) forks the engine core from a process that imported vLLM
once; `spawn` starts a fresh interpreter each time. After one template start (which starts the
template), starts alternate between the two; each generates one fixed request, and the tokens
and logprobs must be the same either way.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from parityrl.bench.stats import Summary, ratios
from parityrl.core.sampling import SamplingConfig
from parityrl.engine.engine import RolloutEngine
from parityrl.engine.settings import EngineSettings
from parityrl.models.builtin import resolve_model


@dataclass
class EngineStartBench:
    model: str = "builtin:tiny"
    reps: int = 5


def run(cfg: EngineStartBench, loop: asyncio.AbstractEventLoop, say=print) -> dict:
    folder = str(resolve_model(cfg.model))
    seconds: dict[str, list[float]] = {"uni": [], "mp": []}
    threads: dict[str, set[int]] = {"uni": set(), "mp": set()}
    for rep in range(cfg.reps):
        for executor in (("mp", "uni") if rep % 2 == 0 else ("uni", "mp")):
            start = time.perf_counter()
            engine = loop.run_until_complete(
                RolloutEngine.start(EngineSettings(model=folder, executor=executor)))
            seconds[executor].append(time.perf_counter() - start)
            threads[executor].add(engine.worker_numerics["worker_threads"])
            loop.run_until_complete(engine.close())
        say(f"  rep {rep + 1}/{cfg.reps}: uni {seconds['uni'][-1]:.1f} s, "
            f"mp {seconds['mp'][-1]:.1f} s")
    methods = start_methods(folder, cfg.reps, loop, say)
    return {
        **methods,
        "engine_start_uni_vs_mp": ratios(seconds["uni"], seconds["mp"]).as_dict(),
        "uni_seconds": Summary.of(seconds["uni"]).as_dict(),
        "mp_seconds": Summary.of(seconds["mp"]).as_dict(),
        "worker_threads": {k: sorted(v) for k, v in threads.items()},
        "setup": cfg.__dict__,
    }


def start_methods(folder: str, reps: int, loop: asyncio.AbstractEventLoop, say=print) -> dict:
    """Template against spawn starts (uni executor), and whether they sample alike."""
    sampling = SamplingConfig(temperature=1.0, max_tokens=8)

    async def start_and_sample(method: str):
        start = time.perf_counter()
        engine = await RolloutEngine.start(EngineSettings(model=folder, start_method=method))
        seconds = time.perf_counter() - start
        rollouts = await engine.generate([5, 6, 7], sampling, n=2, seed=1)
        await engine.close()
        return seconds, [(r.completion_ids, r.logprobs) for r in rollouts]

    first, reference = loop.run_until_complete(start_and_sample("template"))
    seconds: dict[str, list[float]] = {"template": [], "spawn": []}
    same = True
    for rep in range(reps):
        for method in (("spawn", "template") if rep % 2 == 0 else ("template", "spawn")):
            took, sampled = loop.run_until_complete(start_and_sample(method))
            seconds[method].append(took)
            same &= sampled == reference
        say(f"  rep {rep + 1}/{reps}: template {seconds['template'][-1]:.1f} s, "
            f"spawn {seconds['spawn'][-1]:.1f} s")
    return {"engine_start_template_vs_spawn": ratios(seconds["template"],
                                                      seconds["spawn"]).as_dict(),
            "template_seconds": Summary.of(seconds["template"]).as_dict(),
            "spawn_seconds": Summary.of(seconds["spawn"]).as_dict(),
            "template_first_start_seconds": first, "same_samples_either_way": same}
