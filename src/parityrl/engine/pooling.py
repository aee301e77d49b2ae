"""A reward model served by vLLM V1: a sequence-classification folder on the pooling runner.

    engine = await PoolingEngine.start(EngineSettings(model=folder, runner="pooling"))
    scores = await engine.score([ids_a, ids_b], activation=False)   # one float per sequence

Token ids in, one score out per sequence: vLLM's classifier reads the last token's hidden state
(the pooler resolved_settings records), as transformers' `*ForSequenceClassification` does. The
activation is always asked for explicitly: vLLM applies a sigmoid to a one-label score by
default, while TRL rewards with the raw logit.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time

from parityrl.engine.process import (SHUTDOWN_GRACE_S, EngineFiles, core_pids,
                                     log_engine_start, start_async_llm)
from parityrl.engine.settings import EngineSettings, resolved_engine_settings
from parityrl.shm_guard import held_by_this_process_tree


class PoolingEngine:
    def __init__(self, settings: EngineSettings, llm) -> None:
        self.settings = settings
        self.llm = llm
        self._files: EngineFiles | None = None
        self._request_ids = itertools.count()

    @classmethod
    async def start(cls, settings: EngineSettings) -> "PoolingEngine":
        if settings.runner != "pooling":
            raise ValueError("a PoolingEngine needs EngineSettings(runner='pooling')")
        started_at = time.perf_counter()
        engine, files = start_async_llm(settings, lambda llm: cls(settings, llm),
                                        role="reward_model")
        engine._files = files
        log_engine_start(settings, time.perf_counter() - started_at)
        return engine

    def resolved_settings(self) -> dict:
        return resolved_engine_settings(self.llm.vllm_config) | {
            "start_method": self.settings.start_method,
            "cpu_threads_bind": self.settings.cpu_threads_bind,
            "engine_core_pids": core_pids(self.llm)}

    @property
    def dead(self) -> bool:
        return self.llm is None or self.llm.errored

    async def score(self, sequences: list[list[int]], *, activation: bool | None) -> list[float]:
        """The first label's score of each token-id sequence (all requests in flight at once).
        `activation=None` leaves it to vLLM's default (the doctor shows what that does)."""
        return list(await asyncio.gather(*[self._one(ids, activation) for ids in sequences]))

    async def _one(self, ids: list[int], activation: bool | None) -> float:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        params = PoolingParams(task="classify", use_activation=activation)
        final = None
        async for output in self.llm.encode(TokensPrompt(prompt_token_ids=list(ids)), params,
                                            request_id=f"s{next(self._request_ids)}"):
            final = output
        return float(final.outputs.data[0])

    async def close(self) -> None:
        if self.llm is None:
            return
        handler = getattr(self.llm, "output_handler", None)
        held = held_by_this_process_tree()
        self.llm.shutdown(timeout=SHUTDOWN_GRACE_S)
        if isinstance(handler, asyncio.Task) and not handler.done():
            await asyncio.gather(handler, return_exceptions=True)
        self.llm = None
        gc.collect()  # AsyncLLM sits in reference cycles; collect it while its modules still exist
        if self._files is not None:
            self._files.release(held)
