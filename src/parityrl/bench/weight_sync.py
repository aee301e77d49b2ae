"""Weight sync: an in-place update of the running engine against memcpy and against a restart.

For each model size: the seconds `RolloutEngine.update_weights` keeps generation paused (reload in
the worker with its digests, prefix-cache reset, resume; the trainer writes the hand-over file and
its digests just before, while the engine still generates), a memcpy
of the same number of bytes on this machine, and stopping plus starting the engine (what a system
without in-place updates pays, before it even re-submits the aborted requests).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parityrl.bench.stats import Summary
from parityrl.engine.engine import RolloutEngine
from parityrl.engine.settings import EngineSettings
from parityrl.models.load import load_policy
from parityrl.models.tiny import make_model
from parityrl.weights.shm_file import unique_tensors

# (name, make_model keywords); fp32 sizes ≈ 2 MB, 70 MB, 500 MB.
SIZES = [
    ("small", dict(hidden=128, layers=2, heads=4, kv_heads=2)),
    ("medium", dict(hidden=512, layers=4, heads=8, kv_heads=4)),
    ("large", dict(hidden=1024, layers=8, heads=16, kv_heads=8)),
]


@dataclass
class WeightSyncBench:
    sizes: list = field(default_factory=lambda: list(SIZES))
    reps: int = 5


def memcpy_seconds(nbytes: int, reps: int) -> list[float]:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return times


def _breakdown(reports) -> dict:
    """Medians of where a sync's seconds go."""
    def median(values):
        return Summary.of(list(values)).median

    return {
        "trainer_copy_and_digest": median(r.write_seconds for r in reports),
        "worker_digest": median(r.worker_digest_seconds for r in reports),
        "vllm_reload": median(r.load_seconds - r.worker_digest_seconds for r in reports),
        "pause_rpc_resume": median(r.pause_seconds - r.load_seconds for r in reports),
    }


def run(cfg: WeightSyncBench, loop: asyncio.AbstractEventLoop, say=print) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="parityrl-bench-") as tmp:
        for name, shape in cfg.sizes:
            folder = make_model(Path(tmp) / name, **shape)
            state = load_policy(folder, "float32").state_dict()
            sent = unique_tensors(state).values()  # what an update carries (tied lm_head once)
            nbytes = sum(t.numel() * t.element_size() for t in sent)
            say(f"weight sync [{name}]: {nbytes / 2**20:.1f} MiB, starting engine")
            settings = EngineSettings(model=str(folder))
            start = time.perf_counter()
            engine = loop.run_until_complete(RolloutEngine.start(settings))
            start_seconds = time.perf_counter() - start
            try:
                loop.run_until_complete(engine.update_weights(state))  # warm-up
                reports = [loop.run_until_complete(engine.update_weights(state))
                           for _ in range(cfg.reps)]
            finally:
                start = time.perf_counter()
                loop.run_until_complete(engine.close())
                stop_seconds = time.perf_counter() - start
            sync = [r.pause_seconds for r in reports]
            copy = memcpy_seconds(nbytes, cfg.reps)
            copy_median = Summary.of(copy).median
            restart = start_seconds + stop_seconds
            results[name] = {
                "bytes": nbytes,
                "sync_seconds": Summary.of(sync).as_dict(),
                "memcpy_seconds": Summary.of(copy).as_dict(),
                "restart_seconds": restart,
                "sync_vs_memcpy": Summary.of([s / copy_median for s in sync]).as_dict(),
                "sync_vs_restart": Summary.of([s / restart for s in sync]).as_dict(),
                # The hand-over around vLLM's own reload (copy, digests, RPCs, pause/resume),
                # the trainer's copy included although generation goes on during it.
                "handover_vs_memcpy": Summary.of(
                    [(r.write_seconds + r.pause_seconds
                      - (r.load_seconds - r.worker_digest_seconds)) / copy_median
                     for r in reports]).as_dict(),
                "breakdown_seconds": _breakdown(reports),
                "model": shape,
            }
            say(f"  sync {Summary.of(sync)} s, memcpy {copy_median:.4g} s, "
                f"restart {restart:.1f} s")
            del state
    largest = cfg.sizes[-1][0]
    return {"weight_sync_vs_memcpy": results[largest]["sync_vs_memcpy"],
            "weight_handover_vs_memcpy": results[largest]["handover_vs_memcpy"], "sizes": results}
