"""LoRA against full fine-tuning on one model: the engine update and the trainer step.

    lora_sync_vs_full   seconds generation is paused for a rank-R all-linear adapter update
                        (RolloutEngine.update_adapter: PEFT folder, add_lora in place, slot
                        digests, prefix-cache reset) ÷ a full-weight update of the same model on
                        the same engine (update_weights)
    lora_step_vs_full   trainer step seconds (forward with token_logprobs, backward, AdamW) with
                        the adapter ÷ with every weight trainable, on the same batch

Defaults: SmolLM2-135M-Instruct (built locally on first use), float32, rank 8.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from parityrl.bench.stats import Summary
from parityrl.core.sampling import SamplingConfig
from parityrl.engine.engine import RolloutEngine
from parityrl.engine.settings import EngineSettings
from parityrl.models.builtin import resolve_model
from parityrl.models.load import load_policy
from parityrl.trainer.logprobs import token_logprobs
from parityrl.trainer.lora import (
    adapter_state_dict,
    attach_lora,
    is_adapter_name,
    lora_settings,
)
from parityrl.weights.lora_folder import engine_max_rank
from parityrl.weights.shm_file import unique_tensors


@dataclass
class LoRASyncBench:
    model: str = "builtin:smollm2-135m-instruct"
    rank: int = 8
    reps: int = 5
    batch: int = 8  # sequences per trainer step
    seq_len: int = 64


def _step_seconds(model, params, ids: torch.Tensor, reps: int) -> list[float]:
    """Forward (the one logprob function), backward, AdamW over `params`: seconds per step."""
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    mask = torch.ones_like(ids)
    completion = mask.clone()
    completion[:, : ids.shape[1] // 2] = 0
    sampling = SamplingConfig(temperature=1.0, max_tokens=16)
    times = []
    for _ in range(reps + 1):  # the first is a warm-up (allocations, AdamW state)
        start = time.perf_counter()
        out = token_logprobs(model, ids, mask, completion, sampling, with_entropy=False)
        out.logprobs[out.mask].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]


def run(cfg: LoRASyncBench, loop: asyncio.AbstractEventLoop, say=print) -> dict:
    folder = str(resolve_model(cfg.model, say=say))
    model = load_policy(folder, "float32")
    say(f"lora sync [{cfg.model}, rank {cfg.rank}]: starting engine")
    engine = loop.run_until_complete(RolloutEngine.start(EngineSettings(
        model=folder, max_lora_rank=engine_max_rank(cfg.rank))))
    try:
        ids = torch.randint(100, 10000, (cfg.batch, cfg.seq_len),
                            generator=torch.Generator().manual_seed(0))
        full_step = _step_seconds(model, list(model.parameters()), ids, cfg.reps)
        attach_lora(model, cfg.rank, 4.0 * cfg.rank, seed=0, init_b_std=0.01)
        adapter, lora = adapter_state_dict(model), lora_settings(model)
        # The base weights (tied ones still shared: an update sends them once).
        full_state = {n: t for n, t in model.state_dict().items() if not is_adapter_name(n)}
        lora_step = _step_seconds(model, [p for p in model.parameters() if p.requires_grad],
                                  ids, cfg.reps)

        def pushes(push) -> list:
            loop.run_until_complete(push())  # warm-up
            return [loop.run_until_complete(push()) for _ in range(cfg.reps)]

        full_reports = pushes(lambda: engine.update_weights(full_state))
        lora_reports = pushes(lambda: engine.update_adapter(adapter, lora))
        full = [r.pause_seconds for r in full_reports]
        lora_pause = [r.pause_seconds for r in lora_reports]
    finally:
        loop.run_until_complete(engine.close())
    full_median = Summary.of(full).median
    full_step_median = Summary.of(full_step).median
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    full_bytes = sum(t.numel() * t.element_size() for t in unique_tensors(full_state).values())
    say(f"  pause: adapter {Summary.of(lora_pause)} s, full {Summary.of(full)} s; "
        f"step: adapter {Summary.of(lora_step)} s, full {Summary.of(full_step)} s")
    return {
        "lora_sync_vs_full": Summary.of([s / full_median for s in lora_pause]).as_dict(),
        "lora_step_vs_full": Summary.of([s / full_step_median for s in lora_step]).as_dict(),
        "adapter_pause_seconds": Summary.of(lora_pause).as_dict(),
        "full_pause_seconds": Summary.of(full).as_dict(),
        "adapter_step_seconds": Summary.of(lora_step).as_dict(),
        "full_step_seconds": Summary.of(full_step).as_dict(),
        # Medians of where the adapter update's seconds go (the folder is written before the
        # pause, while the engine still generates).
        "adapter_breakdown_seconds": {
            "write_folder_and_digests": Summary.of([r.write_seconds for r in lora_reports]).median,
            "vllm_add_lora_in_worker": Summary.of([r.load_seconds - r.worker_digest_seconds
                                         for r in lora_reports]).median,
            "worker_slot_digests": Summary.of([r.worker_digest_seconds
                                               for r in lora_reports]).median,
            "pause_rpc_reset_version_resume": Summary.of([r.pause_seconds - r.load_seconds
                                                      for r in lora_reports]).median},
        "adapter_bytes": adapter_bytes, "full_bytes": full_bytes,
        "model": cfg.model, "rank": cfg.rank, "batch": [cfg.batch, cfg.seq_len],
    }
