"""Running vLLM engines shared by the whole test session.

An engine takes 15-30 s to start here, most of it vLLM importing itself in the two processes the
CPU platform spawns; the suite asks for an engine about forty times. The host keeps one running
engine per *kind* — what makes two engines compute differently: the model's architecture and
tokenizer (not its weights), the dtype, every numerics knob, the worker extension, the weight
transport — and hands it to whoever asks for that kind next:

    with engines_from(host):            # conftest.py does this for the session
        engine = await start_engine(settings)    # the product's own call (engine/source.py)
        ...                                     # the calls of a RolloutEngine
        await engine.close()                    # handed back, still running

Handing an engine over pushes the asking model folder's weights into it through the product's
own update path (pause(keep) → in-place reload → digests → prefix-cache reset → version 0): the
caller meets an engine that holds exactly its folder's weights at version 0, as a fresh one would,
and every hand-over is one more check of that path. Resource limits (context length, KV cache
size, batch limits) and the engine seed are not part of the kind: an engine at least as large as
asked serves, and the run's engine_settings.json says what it had. The handle honours what the
caller asked where it changes results: its `max_model_len` (a longer prompt is refused with
vLLM's own error, a completion stops where that context ends, as vLLM caps it), and its seed (a
request that brings none gets one drawn from the caller's seed, so a test's samples depend on its
own seed and requests, never on what earlier tests asked of the engine). Batch limits and the KV
cache size only change scheduling; a test that needs them exact (preemptions) starts a private
engine and says so.

The engines live on an event loop of their own, in a thread: tests and product code that run
their own loops (asyncio.run in run_training, the doctor, the CLI) await them through the handle.
Tests that kill an engine, break it, or must watch it start or close start a private one
(RolloutEngine.start) and say why.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from parityrl.core.sampling import SamplingConfig
from parityrl.engine.engine import generate_each
from parityrl.engine.settings import EngineSettings

# Not part of an engine's kind: a larger engine serves a smaller request.
RESOURCES = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_gib")
# What the host starts at least with, so that later requests of the same kind fit.
RESOURCE_FLOOR = {"max_model_len": 512, "max_num_seqs": 256, "max_num_batched_tokens": 4096,
                  "kv_cache_gib": 0.25}
# Files of a model folder vLLM reads besides the weights (what fixes an engine's layout).
_LAYOUT_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
# Entries of those files that say how a model was made, not how it computes.
_PROVENANCE = {"_name_or_path", "name_or_path", "transformers_version", "initializer_range",
               "dtype", "torch_dtype", "_from_model_config"}


def model_layout(folder: str | Path) -> str:
    """A hash of what an engine built from `folder` depends on, weights excepted: two folders with
    the same layout can share an engine (the weights are pushed)."""
    digest = hashlib.sha256()
    for name in _LAYOUT_FILES:
        path = Path(folder) / name
        if not path.exists():
            continue
        raw = path.read_bytes()
        if name.endswith(".json"):
            data = json.loads(raw)
            if isinstance(data, dict):
                data = {k: v for k, v in data.items() if k not in _PROVENANCE}
            raw = json.dumps(data, sort_keys=True).encode()
        digest.update(name.encode() + b"\0" + raw + b"\0")
    return digest.hexdigest()[:16]


def engine_kind(settings: EngineSettings) -> str:
    # Not the seed either: it only seeds requests that bring none, and every request the product
    # sends brings its own (actor, episodes, doctor, pool); a shared engine's global generator has
    # moved on with earlier tests anyway.
    # Nor which core its worker is bound to: one core bound or vLLM's automatic binding run one
    # worker thread each on this machine kind (worker_threads in engine_settings.json), and a
    # pool of LoRA engines (one core each) then shares engines with single-engine tests.
    fields = settings.model_dump(mode="json", exclude={"model", "gpu_memory_utilization", "seed",
                                                       "cpu_threads_bind", *RESOURCES})
    return json.dumps({**fields, "model_layout": model_layout(settings.model)}, sort_keys=True)


def _label(settings: EngineSettings) -> str:
    """A person's name for a kind, in the summary."""
    parts = [Path(settings.model).name, settings.dtype]
    defaults = EngineSettings(model=settings.model)
    for name in ("lm_head_dtype", "logprobs_mode", "enable_prefix_caching", "enforce_eager",
                 "enable_chunked_prefill", "cpu_attn_split_kv", "pad_single_row_gemm",
                 "weight_transport", "max_lora_rank"):
        value = getattr(settings, name)
        if value != getattr(defaults, name):
            parts.append(f"{name}={value}")
    return " ".join(parts)


def _max_positions(folder: str) -> int:
    config = json.loads((Path(folder) / "config.json").read_text())
    return int(config.get("max_position_embeddings", RESOURCE_FLOOR["max_model_len"]))


@dataclass
class Start:
    label: str
    seconds: float
    kind: str


class EngineHost:
    def __init__(self, max_idle: int = 8) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-host",
                                        daemon=True)
        self._thread.start()
        # Running engines nobody holds (~1 GB each for a tiny model): past this many, one goes
        # (_least_needed).
        self.max_idle = max_idle
        self._idle: list[tuple[str, object]] = []  # (kind, RolloutEngine), oldest first
        self._asked: dict[str, int] = {}  # kind → leases so far
        self._held: set[int] = set()
        self._holds: dict[int, str] = {}  # engine → folder whose weights it holds at version 0
        self.starts: list[Start] = []
        self.leases = 0  # engines handed to callers
        self.handovers = 0  # ... that first took the caller's weights
        self.asked_by: dict[str, set[str]] = {}  # kind → the test files that asked for it

    # -- the EngineSource the product asks (engine/source.py) ---------------------------------
    async def start(self, settings: EngineSettings) -> "SharedEngine":
        return await self.on_host(self._lease(settings))

    async def on_host(self, coro):
        """Await `coro` on the host's loop from any event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close_all(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    # -- on the host's loop ---------------------------------------------------------------------
    async def _lease(self, settings: EngineSettings) -> "SharedEngine":
        kind = engine_kind(settings)
        self.leases += 1
        self._asked[kind] = self._asked.get(kind, 0) + 1
        self.asked_by.setdefault(kind, set()).add(self._current_file())
        engine = await self._take_idle(kind, settings)
        if engine is None:
            engine = await self._start(settings)
        self._held.add(id(engine))
        try:
            await self._hand_over(engine, settings)
        except BaseException:
            await self._drop(engine)
            raise
        return SharedEngine(self, engine, settings)

    async def _take_idle(self, kind: str, settings: EngineSettings):
        for i, (k, engine) in enumerate(self._idle):
            if k == kind and all(getattr(engine.settings, r) >= getattr(settings, r)
                                 for r in RESOURCES):
                del self._idle[i]
                if await engine.alive():
                    return engine
                await self._drop(engine)
                return None
        return None

    async def _start(self, settings: EngineSettings):
        from parityrl.engine.engine import RolloutEngine

        floor = dict(RESOURCE_FLOOR, max_model_len=min(RESOURCE_FLOOR["max_model_len"],
                                                       _max_positions(settings.model)))
        sized = settings.model_copy(update={r: max(getattr(settings, r), floor[r])
                                            for r in RESOURCES})
        while len(self._idle) >= self.max_idle:  # memory: each engine is two processes
            _, engine = self._idle.pop(self._least_needed())
            await self._drop(engine)
        started = time.perf_counter()
        engine = await RolloutEngine.start(sized)
        self.starts.append(Start(_label(settings), time.perf_counter() - started,
                                 engine_kind(settings)))
        self._holds[id(engine)] = str(settings.model)
        return engine

    def _least_needed(self) -> int:
        """The idle engine to stop first: one the running test file has not asked for (a file
        runs whole on one worker, so its own kinds come back soonest), then the kind asked for
        least often, then the longest idle (min() keeps the first of a tie)."""
        here = self._current_file()
        return min(range(len(self._idle)), key=lambda i: (
            here in self.asked_by.get(self._idle[i][0], ()), self._asked[self._idle[i][0]]))

    @staticmethod
    def _current_file() -> str:
        return Path(os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[0]).name

    async def _hand_over(self, engine, settings: EngineSettings) -> None:
        """The engine holds `settings.model`'s weights at version 0, nothing in flight, its
        preemption count at 0: what a fresh engine would be."""
        from safetensors.torch import load_file

        deadline = time.monotonic() + 30
        while await engine.unfinished_requests():
            if time.monotonic() > deadline:
                raise RuntimeError("a shared engine still has requests of an earlier test")
            await asyncio.sleep(0.05)
        folder = str(settings.model)
        if self._holds.get(id(engine)) != folder or engine.version != 0:
            state = {}
            for file in sorted(Path(folder).glob("*.safetensors")):
                state |= load_file(str(file))
            await engine.update_weights(state, version=0)  # digests checked: raises on a gap
            self._holds[id(engine)] = folder
            self.handovers += 1
        if engine.preemption_counter is not None:
            engine.preemption_counter.preemptions = 0
        engine.adapter = None  # a fresh LoRA engine has no adapter until one is pushed

    async def _give_back(self, engine) -> None:
        self._held.discard(id(engine))
        if not await engine.alive():
            await self._drop(engine)
            return
        self._idle.append((engine_kind(engine.settings), engine))

    async def _drop(self, engine) -> None:
        self._holds.pop(id(engine), None)
        self._held.discard(id(engine))
        try:
            await engine.close()
        except Exception:  # noqa: BLE001 - a dead engine; its processes are gone already
            pass

    async def _close_all(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._drop(engine) for _, engine in idle))

    def mark_changed(self, engine) -> None:
        """The engine's weights moved away from its folder's (an update through a handle)."""
        self._holds.pop(id(engine), None)


class SharedEngine:
    """A shared engine as its caller sees it: a RolloutEngine's calls, run on the host's loop.
    `close()` hands it back. Settings and resolved settings name the caller's model folder (the
    engine was started from another folder of the same layout, then given these weights)."""

    def __init__(self, host: EngineHost, engine, settings: EngineSettings) -> None:
        self._host, self._engine = host, engine
        self.settings = engine.settings.model_copy(update={"model": settings.model})
        self._asked = settings
        self._seeds = random.Random(settings.seed)  # for requests that bring no seed
        self._closed = False

    @property
    def version(self) -> int:
        return self._engine.version

    @property
    def preemption_counter(self):
        return self._engine.preemption_counter

    def resolved_settings(self) -> dict:
        resolved = self._engine.resolved_settings()
        started_from = resolved["model"]
        resolved["model"] = str(self.settings.model)
        if started_from != resolved["model"]:
            resolved["engine_started_from"] = started_from  # its weights replaced by a push
        return resolved

    async def generate(self, prompt_ids: list[int], sampling: SamplingConfig, *, n: int = 1,
                       seed: int | None = None, group_id: int = 0):
        sampling = self._within_asked_context(prompt_ids, sampling)
        if seed is None:
            seed = self._seeds.randrange(2**31)
        return await self._host.on_host(self._engine.generate(prompt_ids, sampling, n=n, seed=seed,
                                                              group_id=group_id))

    async def generate_many(self, prompts: list[list[int]], sampling: SamplingConfig, *,
                            n: int = 1, seed: int | None = None):
        return await generate_each(self.generate, prompts, sampling, n=n, seed=seed)

    def _within_asked_context(self, prompt_ids: list[int], sampling: SamplingConfig):
        """vLLM's own checks against the caller's max_model_len, not the engine's larger one."""
        from vllm.exceptions import VLLMValidationError

        limit = self._asked.max_model_len
        if len(prompt_ids) >= limit:
            raise VLLMValidationError(
                f"The decoder prompt (length {len(prompt_ids)}) is longer than the maximum "
                f"model length of {limit} (asked of a shared test engine).")
        room = limit - len(prompt_ids)
        if sampling.max_tokens > room:  # vLLM stops a request at max_model_len: "length"
            return sampling.model_copy(update={"max_tokens": room})
        return sampling

    async def update_weights(self, *args, **kwargs):
        self._host.mark_changed(self._engine)
        return await self._host.on_host(self._engine.update_weights(*args, **kwargs))

    async def update_adapter(self, *args, **kwargs):
        return await self._host.on_host(self._engine.update_adapter(*args, **kwargs))

    @property
    def adapter(self):
        return self._engine.adapter

    def serve_adapter_folder(self, *args, **kwargs) -> None:
        self._engine.serve_adapter_folder(*args, **kwargs)

    async def alive(self) -> bool:
        return not self._closed and await self._host.on_host(self._engine.alive())

    async def unfinished_requests(self) -> int:
        return await self._host.on_host(self._engine.unfinished_requests())

    async def pad_single_row_gemms(self, on: bool = True) -> None:
        await self._host.on_host(self._engine.pad_single_row_gemms(on))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._host.on_host(self._host._give_back(self._engine))

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            asyncio.run_coroutine_threadsafe(self._host._give_back(self._engine),
                                              self._host.loop).result()
