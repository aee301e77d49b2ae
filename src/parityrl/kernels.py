"""vLLM's CPU kernels as both sides of the data path call them.

The engine's worker and the trainer's bitwise pass (trainer/engine_kernels.py) must run a GEMM the
same way; what they share lives here, below both, so that neither imports the other.
"""

from __future__ import annotations


def pad_single_row(linear):
    """`linear(x, weight, bias)` that runs a one-row input as two identical rows: oneDNN gives a
    row the same bits for every M >= 2, but its M = 1 kernel differs when K >= 1280. The engine's
    worker (engine/worker_extension.py) and the trainer's kernel pass (trainer/engine_kernels.py) both go through it."""
    if getattr(linear, "parityrl_padded", False):
        return linear

    def padded(x, weight, bias):
        if x.numel() == x.shape[-1]:
            rows = x.reshape(1, -1).expand(2, -1).contiguous()
            return linear(rows, weight, bias)[:1].view(*x.shape[:-1], -1)
        return linear(x, weight, bias)

    padded.parityrl_padded = True
    padded.parityrl_unpadded = linear
    return padded


def pad_single_row_gemms(model, on: bool = True) -> int:
    """Wrap each module's CPU GEMM (`cpu_linear`, set by vLLM's dispatch after every load) with
    `pad_single_row` (the trainer's batched pass never has M = 1), or unwrap it (`on=False`)."""
    changed = 0
    for module in model.modules():
        linear = getattr(module, "cpu_linear", None)
        if linear is None or getattr(linear, "parityrl_padded", False) == on:
            continue
        module.cpu_linear = pad_single_row(linear) if on else linear.parityrl_unpadded
        changed += 1
    return changed
