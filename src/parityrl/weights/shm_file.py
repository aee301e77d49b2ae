"""Trainer state dict → a shared-memory safetensors file the engine's worker loads in place.

The engine runs in another process. Both sides keep the same file in shared memory mapped between
updates (`torch.from_file(shared=True)`): the trainer copies each tensor into its slot (cast to
the engine's dtype on the way), the worker hands vLLM views of the slots, and vLLM's loader copies
them into the model. One copy on each side, no serialisation, and no page faults after the first
update — a fresh mapping of 480 MB costs about 0.8 s of faults, the copy itself 0.04 s. The file is
valid safetensors (8-byte header length, JSON header, data), so it stays inspectable.

Digests are taken tensor by tensor right after the copy (sender) and right before vLLM's copy
(worker), while the bytes are still in cache.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from parityrl.weights.digest import tensor_digest
from parityrl.weights.update import WeightsPayload, checked_against_checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_NAMES.items()}


def unique_tensors(
    state_dict: dict[str, torch.Tensor], skip: set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """The tensors an update sends: `state_dict` minus `skip`, a tied lm_head once."""
    tensors: dict[str, torch.Tensor] = {}
    owner: dict[int, str] = {}  # data_ptr → the name it is sent under
    for name, value in state_dict.items():
        if name in skip:
            continue
        ptr = value.data_ptr()
        if ptr in owner and name.endswith("lm_head.weight"):
            # Tied embeddings: one tensor, stored once under the embedding's name (as HF saves it).
            continue
        if ptr in owner and owner[ptr].endswith("lm_head.weight"):
            del tensors[owner[ptr]]  # the lm_head came first (a sorted state dict)
        owner[ptr] = name
        tensors[name] = value
    return tensors


def _header(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[bytes, dict]:
    """safetensors header: every tensor in `dtype`, back to back (one dtype keeps them aligned)."""
    meta, offset = {}, 0
    size = torch.tensor([], dtype=dtype).element_size()
    for name, t in tensors.items():
        end = offset + t.numel() * size
        meta[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(t.shape),
                      "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, meta


def _views(buffer: torch.Tensor, header_len: int, meta: dict) -> Iterator[tuple[str, torch.Tensor]]:
    data = buffer[header_len:]
    for name, info in meta.items():
        start, end = info["data_offsets"]
        dtype = _TORCH_DTYPES[info["dtype"]]
        yield name, data[start:end].view(dtype).view(info["shape"])


# Below this many elements (32 MiB in fp32) a tensor is copied on one thread. The engine's
# processes hold the other cores (its worker computes, vLLM's engine core spin-waits), so a
# parallel copy_ waits for a core each time: a 2 MiB model took 45 ms instead of 1.5 ms on 2
# cores, a 60 MiB one 96 ms instead of 17 ms. Only copies long enough to amortise that wait go
# parallel.
_PARALLEL_COPY_NUMEL = 1 << 23


def _copy_and_digest(slot: torch.Tensor, tensor: torch.Tensor) -> str:
    slot.copy_(tensor.detach().reshape(slot.shape))
    return tensor_digest(slot)


@contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SharedUpdateFile:
    """The trainer's side: one file in `folder`, reused while the layout stays the same."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path: Path | None = None
        self._buffer: torch.Tensor | None = None

    def write(
        self, state_dict: dict[str, torch.Tensor], dtype: str, skip: set[str] = frozenset()
    ) -> tuple[Path, dict[str, str]]:
        """Copy `state_dict` (minus `skip`) into the file in `dtype`; return it and the digests."""
        tensors = unique_tensors(state_dict, skip)
        header, meta = _header(tensors, _DTYPES[dtype])
        size = len(header) + (max(m["data_offsets"][1] for m in meta.values()) if meta else 0)
        if self._buffer is None or self._buffer.numel() != size:
            self._remap(size)
        buffer = self._buffer
        digests = {}
        buffer[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        slots = list(_views(buffer, len(header), meta))
        small = [(n, v) for n, v in slots if v.numel() < _PARALLEL_COPY_NUMEL]
        large = [(n, v) for n, v in slots if v.numel() >= _PARALLEL_COPY_NUMEL]
        with _one_thread():
            for name, slot in small:
                digests[name] = _copy_and_digest(slot, tensors[name])
        for name, slot in large:
            digests[name] = _copy_and_digest(slot, tensors[name])
        return self.path, digests

    def _remap(self, size: int) -> None:
        self.close()
        self.path = self.folder / f"update-{uuid.uuid4().hex}.safetensors"
        self._buffer = torch.from_file(str(self.path), shared=True, size=size, dtype=torch.uint8)

    def close(self) -> None:
        self._buffer = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class SharedFileTransport:
    """The shared file as an update's transport (weights/update.py): one engine on this host.

    Written while the engine still generates: after a reload the engine holds copies, never views
    of the file (checked in the worker), so the file is free until the next reload reads it, and
    generation pauses only for the reload itself."""

    writes_ahead = True  # weights/update.py Transport

    def __init__(self, folder: Path, dtype: str) -> None:
        self.file = SharedUpdateFile(folder)
        self.dtype = dtype

    def prepare(self, payload: WeightsPayload) -> dict[str, str]:
        _, sent = self.file.write(payload.state_dict, self.dtype, skip=payload.skip)
        return sent

    async def load(self, engines) -> list[dict]:
        return [await e.worker_call("parityrl_load_weights", str(self.file.path))
                for e in engines]

    check = staticmethod(checked_against_checkpoint)

    async def loaded(self, engines) -> None:
        pass

    def close(self) -> None:
        self.file.close()


class MappedUpdateFile:
    """The worker's side: the same file mapped once, read as views for every update."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._buffer: torch.Tensor | None = None

    def tensors(self, path: str) -> Iterator[tuple[str, torch.Tensor]]:
        if path != self.path:
            self._buffer = torch.from_file(path, shared=True, size=os.path.getsize(path),
                                           dtype=torch.uint8)
            self.path = path
        buffer = self._buffer
        header_len = int.from_bytes(buffer[:8].numpy().tobytes(), "little")
        meta = json.loads(buffer[8:8 + header_len].numpy().tobytes())
        yield from _views(buffer, 8 + header_len, meta)

    def aliased(self, tensors) -> list[torch.Tensor]:
        """The tensors whose memory lies inside the mapped file (they must have copied it)."""
        if self._buffer is None:
            return []
        lo = self._buffer.data_ptr()
        hi = lo + self._buffer.numel()
        return [t for t in tensors if lo <= t.data_ptr() < hi]


def checkpoint_tensor_names(model_dir: str | Path) -> set[str]:
    """Names of the tensors in a model folder's safetensors files (headers only)."""
    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names
