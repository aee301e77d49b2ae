"""Engine start: seconds from `RolloutEngine.start` to a ready engine, per executor.

`executor: uni` (the default) runs the model in vLLM's engine-core process; `mp` is vLLM's CPU
choice, a worker process of its own (two processes to spawn, each importing vLLM). Starts
alternate between the two, so machine drift hits both alike; each start also checks that the
model runs with the same OpenMP thread count either way.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from parityrl.bench.stats import Summary, ratios
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
    return {
        "engine_start_uni_vs_mp": ratios(seconds["uni"], seconds["mp"]).as_dict(),
        "uni_seconds": Summary.of(seconds["uni"]).as_dict(),
        "mp_seconds": Summary.of(seconds["mp"]).as_dict(),
        "worker_threads": {k: sorted(v) for k, v in threads.items()},
        "setup": cfg.__dict__,
    }
