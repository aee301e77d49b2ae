"""Weights over torch.distributed (gloo) through vLLM's weight-transfer API.

The transport for an engine that does not share memory with the trainer (another process
group, another host). vLLM 0.32 owns the update's life cycle (`start_weight_update` →
`update_weights` → `finish_weight_update`, in-place layer-by-layer reload); its built-in backends
need CUDA, so this module registers a CPU one under `BACKEND`:

- engine side, `GlooWeightTransferEngine`, inside vLLM's worker (registered when the worker
  imports parityrl's worker extension): joins a process group of the trainer (rank 0) and every
  engine worker, receives each tensor by broadcast into a fresh buffer, digests it and hands it to
  the model's `load_weights`;
- trainer side, `GlooTrainerTransfer`, created through vLLM's `WeightTransferTrainerFactory`:
  broadcasts the tensors an update carries (cast to the engine's dtype, digested as they go)
  while the engine's `update_weights` RPC runs.

`GlooTransport` is the trainer side as an update's transport: pausing, prefix-cache reset,
versions and the digest comparison are weights/update.py's, the same for every transport.
"""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar, Iterator, Protocol

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from parityrl.weights import GLOO_BACKEND as BACKEND
from parityrl.weights.digest import tensor_digest
from parityrl.weights.shm_file import unique_tensors
from parityrl.weights.update import WeightsPayload, checked_against_checkpoint


def register() -> None:
    """Make `BACKEND` known to vLLM's factories in this process (idempotent)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    for factory, cls in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                         (WeightTransferTrainerFactory, "GlooTrainerTransfer")):
        if BACKEND not in factory._registry:
            factory.register_engine(BACKEND, __name__, cls)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _group(host: str, port: int, rank: int, world_size: int):
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(host, port, rank, world_size,
                                                          backend="gloo")


# --- engine side (vLLM's worker process) ---------------------------------------------------------

@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int  # this engine's first worker rank in the group (rank 0 is the trainer)
    world_size: int


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.digests: dict[str, str] = {}  # of what this update handed to vLLM, by name
        self.digest_seconds = 0.0

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        rank = init_info.rank_offset + self.parallel_config.rank
        self.group = _group(init_info.master_address, init_info.master_port, rank,
                            init_info.world_size)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.digests, self.digest_seconds = {}, 0.0
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises without an
        # accelerator; gloo's broadcast has completed when wait() returns.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised")
        for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names,
                                           update_info.shapes, strict=True):
            # A fresh buffer each time: the layer-wise reload keeps it until its layer is full.
            tensor = torch.empty(shape, dtype=getattr(torch, dtype_name))
            self.group.broadcast(tensor, 0).wait()
            start = time.perf_counter()
            self.digests[name] = tensor_digest(tensor)
            self.digest_seconds += time.perf_counter() - start
            self.model.load_weights([(name, tensor)])

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        self.group = None


# --- trainer side --------------------------------------------------------------------------------

class StateDictSource(WeightSource):
    """The tensors an update carries (a tied lm_head once), cast to the engine's dtype and
    digested as they are produced."""

    def __init__(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                 skip: set[str] = frozenset()) -> None:
        self.tensors = unique_tensors(state_dict, skip)
        self.dtype = dtype
        self.digests: dict[str, str] = {}

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, self.dtype, tuple(t.shape)) for n, t in self.tensors.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.tensors.items():
            sent = tensor.detach().to(self.dtype).contiguous()
            self.digests[name] = tensor_digest(sent)
            yield name, sent


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    master_address: str = "127.0.0.1"
    master_port: int = 0
    world_size: int = 2  # the trainer + every engine worker
    rank_offset: int = 1  # the engine's first worker rank


class GlooTrainerTransfer(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    init_info_cls = GlooTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        self = cls(client=client, source=source, is_sender=init_info.is_sender)
        engine_info = {"master_address": init_info.master_address,
                       "master_port": init_info.master_port,
                       "rank_offset": init_info.rank_offset,
                       "world_size": init_info.world_size}
        # Both sides block in the rendezvous: the engine's RPC runs beside ours.
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, engine_info)
            self.group = _group(init_info.master_address, init_info.master_port, 0,
                                init_info.world_size)
            joined.result()
        return self

    def send_weights(self) -> None:
        meta = self.source.metadata()
        info = {"names": [m.name for m in meta],
                "dtype_names": [str(m.dtype).removeprefix("torch.") for m in meta],
                "shapes": [list(m.shape) for m in meta]}
        self.client.start_weight_update()
        with ThreadPoolExecutor(1) as pool:
            received = pool.submit(self.client.update_weights, info)
            for _, tensor in self.source:
                self.group.broadcast(tensor, 0).wait()
            received.result()
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


class EngineGroupClient:
    """vLLM's `VLLMWeightSyncClient` protocol (synchronous, dicts) over one or several engines
    whose event loop runs in another thread: the trainer side calls it from a worker thread.
    Every call goes to every engine at once; engine i's worker joins the group at rank
    `rank_offset + i` (one worker per engine). An engine is anything with the `transfer_*`
    coroutines of `RolloutEngine` (in this process, or a stand-in for a Ray actor)."""

    def __init__(self, engines: list, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.engines = engines
        self.loop = loop
        self.timeout = timeout  # seconds for one call; more means a stuck engine

    def _each(self, call) -> None:
        async def all_engines():
            await asyncio.gather(*(call(i, engine) for i, engine in enumerate(self.engines)))

        asyncio.run_coroutine_threadsafe(all_engines(), self.loop).result(self.timeout)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._each(lambda i, engine: engine.transfer_init(
            init_info | {"rank_offset": init_info["rank_offset"] + i}))

    def start_weight_update(self) -> None:
        self._each(lambda i, engine: engine.transfer_start())

    def update_weights(self, update_info: dict) -> None:
        self._each(lambda i, engine: engine.transfer_update(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._each(lambda i, engine: engine.transfer_finish(weight_version))


class GroupMember(Protocol):
    """An engine in a gloo group: vLLM's weight-transfer calls, answered by its engine (a
    RolloutEngine here, or a Ray actor's through its stand-in)."""

    async def transfer_init(self, init_info: dict) -> None: ...

    async def transfer_start(self) -> None: ...

    async def transfer_update(self, update_info: dict) -> None: ...

    async def transfer_finish(self, weight_version: str | None = None) -> None: ...


class GlooTransport:
    """One broadcast reaches every engine of a group (weights/update.py drives it): rank 0 the
    trainer, engine i's worker at rank 1 + i. The trainer's digests fill in as the tensors go
    out; each engine's worker reports its own after vLLM's finish_weight_update."""

    writes_ahead = False  # weights/update.py Transport

    def __init__(self, transfer: GlooTrainerTransfer, dtype: str, timeout: float) -> None:
        self.transfer = transfer
        self.dtype = dtype
        self.timeout = timeout  # seconds for one broadcast; more means a stuck engine
        self._source: StateDictSource | None = None

    @classmethod
    async def join(cls, engines: list[GroupMember], address: str, dtype: str,
                   timeout: float) -> "GlooTransport":
        """The group, created through vLLM's trainer factory while the engines join it in their
        own calls."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        register()
        info = GlooTrainerInitInfo(master_address=address, master_port=free_port(address),
                                   world_size=1 + len(engines), rank_offset=1, rank=0)
        client = EngineGroupClient(engines, asyncio.get_running_loop(), timeout)
        transfer = await asyncio.to_thread(WeightTransferTrainerFactory.trainer_init, info,
                                           client=client)
        return cls(transfer, dtype, timeout)

    def prepare(self, payload: WeightsPayload) -> dict[str, str]:
        self._source = StateDictSource(payload.state_dict, getattr(torch, self.dtype),
                                       payload.skip)
        return self._source.digests

    async def load(self, engines) -> list[dict]:
        start = time.perf_counter()
        self.transfer.source = self._source
        await asyncio.wait_for(asyncio.to_thread(self.transfer.send_weights), self.timeout)
        loaded = time.perf_counter() - start
        results = await asyncio.gather(*(e.worker_call("parityrl_finish_transfer")
                                         for e in engines))
        return [result | {"load_seconds": loaded} for result in results]

    check = staticmethod(checked_against_checkpoint)

    async def loaded(self, engines) -> None:
        pass

