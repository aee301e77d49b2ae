"""Tensor digests: the same function on both sides of a weight update.

A digest is a 128-bit XXH3 hash of a tensor's bytes plus its dtype and shape, so any changed bit,
cast or reshape shows. XXH3 is not cryptographic — it guards against bugs, not adversaries — and
it hashes at memory speed (BLAKE2b, at 0.76 GB/s here, was half the time of a 480 MB update).
The trainer digests what it sends; the engine's worker digests what it receives and hands to
vLLM's loader; `compare_digests` says which tensors are missing, extra or different.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import xxhash


def tensor_digest(tensor: torch.Tensor) -> str:
    t = tensor.detach().contiguous().cpu()
    h = xxhash.xxh3_128()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own memory, no copy
    return h.hexdigest()


@dataclass
class DigestCheck:
    """Outcome of comparing the trainer's digests with the engine's."""

    missing: list[str] = field(default_factory=list)  # expected by the engine, not received
    unexpected: list[str] = field(default_factory=list)  # received, not in the engine's checkpoint
    different: list[str] = field(default_factory=list)  # received with other bytes than sent
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.different)

    def summary(self) -> str:
        if self.ok:
            return f"{self.checked} tensors identical on both sides"
        parts = []
        for label, names in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("different", self.different)):
            if names:
                shown = ", ".join(names[:4]) + (" …" if len(names) > 4 else "")
                parts.append(f"{len(names)} {label} ({shown})")
        return "weight sync check failed: " + "; ".join(parts)


def compare_digests(
    sent: dict[str, str], received: dict[str, str], engine_names: set[str]
) -> DigestCheck:
    """Compare what the trainer sent, what the engine received, and what the engine must hold.

    `engine_names` are the tensor names of the checkpoint the engine was started from: an update
    must replace every one of them, or the engine keeps a stale tensor (vLLM only logs a warning).
    """
    check = DigestCheck(checked=len(received))
    check.missing = sorted(engine_names - set(received))
    check.unexpected = sorted(set(received) - engine_names)
    check.different = sorted(
        name for name in set(sent) | set(received)
        if name in engine_names and sent.get(name) != received.get(name) and name in received
    )
    return check
