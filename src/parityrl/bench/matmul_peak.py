"""This machine's physical limit for the side-by-side: float32 matmul rate on n cores, and the
model FLOPs a token costs, so that each phase's throughput reads as a fraction of the limit."""

from __future__ import annotations

import time

import torch


def matmul_peak(threads: int, size: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a float32 [size × size] @ [size × size] torch.mm on `threads` threads, best of
    `reps` (the rate a well-shaped GEMM reaches here: what no phase can beat)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # oneDNN/MKL pick and warm their kernels
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best / 1e9


def model_flops_per_token(model) -> float:
    """Forward FLOPs a token costs in the model's matmuls: 2 × (decoder matmul weights + the
    lm_head's vocabulary × hidden). Attention's score products are left out (short sequences);
    training costs 3× this (forward + backward), generation 1×."""
    layers = sum(p.numel() for name, p in model.get_decoder().named_parameters()
                 if p.dim() == 2 and "embed" not in name)
    return 2.0 * (layers + model.get_output_embeddings().weight.numel())


def phase_fractions(rows: list[dict], engine_key: str, cores: dict, peaks: dict,
                    flops_per_token: float, prompt_len: float) -> dict:
    """Model FLOP/s of an arm's generation and training (means over steps after the first) as
    fractions of the matmul peak on the cores each phase used."""
    rows = rows[1:] or rows
    tokens = sum(r["tokens"] + r["completions"] * prompt_len for r in rows)
    seconds = {"engine": sum(r["stages"].get(engine_key, 0.0) for r in rows),
               "trainer": sum(r["stages"].get("train", 0.0) for r in rows)}
    work = {"engine": flops_per_token * tokens, "trainer": 3 * flops_per_token * tokens}
    out = {}
    for phase in ("engine", "trainer"):
        if seconds[phase] > 0:
            rate = work[phase] / seconds[phase] / 1e9
            peak = peaks[str(cores[phase])]
            out[phase] = {"gflops": rate, "cores": cores[phase], "peak_gflops": peak,
                          "fraction_of_peak": rate / peak}
    return out
