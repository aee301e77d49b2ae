"""One weight update, written once: for every transport and every kind of engine.

    reports = await push(engines, transport, payload, version=step)

While the engines still generate, the transport prepares what it sends (the shared file written,
the adapter folder written, the digests predicted). Then every engine pauses with its requests
kept (`mode="keep"`, KV cache kept), the transport loads, each engine's worker reports what it
received, each engine resets its prefix cache (cached prefixes were computed by the old weights,
and vLLM does not drop them on a reload) and takes the version, and all resume, a failed load
included. Last, each engine's digests are compared with the trainer's; `verify` turns a
difference into a WeightSyncError.

The transports (`Transport`) are the shared-memory file (weights/shm_file.py), the gloo
broadcast through vLLM's weight-transfer API (weights/gloo.py) and the LoRA adapter folder
(weights/lora_folder.py). An engine takes part through `UpdateTarget`: a RolloutEngine answers in
this process, a Ray engine's stand-in forwards each step to its actor.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from parityrl.weights.digest import DigestCheck, compare_digests


@dataclass
class UpdateReport:
    version: int
    check: DigestCheck
    pause_seconds: float  # generation paused: pause, load, prefix-cache reset, resume
    write_seconds: float  # before the pause, trainer side: cast, hand-over file, digests
    load_seconds: float  # inside the worker: digests + vLLM's in-place reload (copy, repack)
    worker_digest_seconds: float  # the part of load_seconds spent on digests
    engines_verified: int = 1  # engines of this update whose digests matched the trainer's


class WeightSyncError(RuntimeError):
    """The engine does not hold what the trainer sent."""


@dataclass
class WeightsPayload:
    """Every weight of the policy (the shared file and gloo send it)."""

    state_dict: dict[str, Any]
    skip: frozenset[str] | set[str] = frozenset()  # left out on purpose (the doctor, tests)


class UpdateTarget(Protocol):
    """One engine, as an update drives it: each step one call."""

    version: int
    update_lock: asyncio.Lock  # one update at a time per engine
    expected_names: set[str]  # the tensors the engine's checkpoint has: an update replaces all

    async def pause(self) -> None: ...

    async def worker_call(self, method: str, *args) -> Any:
        """One call of parityrl's worker extension (engine/worker_extension.py)."""
        ...

    async def after_load(self, version: int | None, reset_prefix_cache: bool) -> None: ...

    async def resume(self) -> None: ...


class Transport(Protocol):
    """How an update's bytes reach the engines."""

    # Whether `prepare` writes the bytes ahead of the pause (the report's write_seconds); a
    # broadcast casts and digests them as they go out, inside the load.
    writes_ahead: bool

    def prepare(self, payload) -> dict[str, str]:
        """Trainer side, before the pause: make ready what `payload` sends; the digests of what
        is sent (a dict that may still fill while `load` sends)."""
        ...

    async def load(self, engines: Sequence[UpdateTarget]) -> list[dict]:
        """While the engines are paused: each engine's worker result (digests, seconds)."""
        ...

    def check(self, engine: UpdateTarget, sent: dict[str, str], result: dict) -> DigestCheck:
        """What `engine` received against what was sent and what it must hold."""
        ...

    async def loaded(self, engines: Sequence[UpdateTarget]) -> None:
        """After the load and the version, before generation resumes."""
        ...


def checked_against_checkpoint(engine: UpdateTarget, sent: dict[str, str],
                               result: dict) -> DigestCheck:
    """Every tensor of the engine's checkpoint replaced, each with the bytes sent."""
    return compare_digests(sent, result["digests"], engine.expected_names)


async def push(engines: Sequence[UpdateTarget], transport: Transport, payload, *,
               version: int | None, verify: bool = True,
               reset_prefix_cache: bool = True) -> list[UpdateReport]:
    """One update of every engine in `engines` (see the module docstring); a report each, in
    order, each counting the engines whose digests matched (`engines_verified`)."""
    async with AsyncExitStack() as locks:
        for engine in engines:
            await locks.enter_async_context(engine.update_lock)
        write_start = time.perf_counter()
        sent = transport.prepare(payload)
        start = time.perf_counter()
        try:
            await asyncio.gather(*(e.pause() for e in engines))
            results = await transport.load(engines)
            await asyncio.gather(*(e.after_load(version, reset_prefix_cache) for e in engines))
            await transport.loaded(engines)
        finally:
            resumed = await asyncio.gather(*(e.resume() for e in engines),
                                           return_exceptions=True)
            failed = [r for r in resumed if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
        pause_seconds = time.perf_counter() - start
    write_seconds = start - write_start if transport.writes_ahead else 0.0
    reports = [UpdateReport(e.version, transport.check(e, sent, result), pause_seconds,
                            write_seconds, result["load_seconds"],
                            result["digest_seconds"])
               for e, result in zip(engines, results)]
    bad = [(i, r) for i, r in enumerate(reports) if not r.check.ok]
    for report in reports:
        report.engines_verified = len(reports) - len(bad)
    if verify and bad:
        if len(engines) == 1:
            raise WeightSyncError(bad[0][1].check.summary())
        raise WeightSyncError("; ".join(f"engine {i}: {r.check.summary()}" for i, r in bad))
    return reports
