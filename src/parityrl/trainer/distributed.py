"""Several trainer ranks: one torch.distributed group, the decoder layers sharded with FSDP2.

    dist = init_trainer_group(rank, world_size, address, port)     # gloo (CPU) or nccl (CUDA)
    trainer = Trainer(cfg, model, pad_id, dist=dist)                 # shards the model itself

Every rank receives the whole batch: FSDP2 (`fully_shard`) shards the parameters, gradients and
optimizer state of the decoder layers over the ranks — memory, the reason to shard — while the
compute is not split. The embeddings, the final norm and the lm_head stay whole on every rank:
`token_logprobs` projects the decoder's hidden states with the lm_head weight itself (the fp32
projection), outside any module forward that FSDP could hook. Their gradients are averaged over
the ranks as FSDP averages the sharded ones, so every rank steps the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class DistContext:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_trainer_group(rank: int, world_size: int, address: str, port: int) -> DistContext:
    """Join the trainer ranks' default process group (TCP rendezvous at rank 0's address)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                                  world_size=world_size)
    return DistContext(rank, world_size)


def shard_model(model) -> list[torch.nn.Parameter]:
    """`fully_shard` each decoder layer; returns the parameters left whole (replicated)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer)
    return [p for p in model.parameters() if not _is_sharded(p)]


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def average_replicated_grads(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of the whole (unsharded) parameters over the ranks."""
    world = torch_dist.get_world_size()
    for p in params:
        if p.grad is not None:
            torch_dist.all_reduce(p.grad, op=torch_dist.ReduceOp.SUM)
            p.grad.div_(world)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over sharded and whole parameters together: each sharded
    gradient's local part squared and summed over the ranks, each whole one counted once."""
    sharded = torch.zeros((), dtype=torch.float64)
    whole = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        if _is_sharded(g):
            sharded += g.to_local().double().pow(2).sum()
        else:
            whole += g.double().pow(2).sum()
    torch_dist.all_reduce(sharded, op=torch_dist.ReduceOp.SUM)
    total = (sharded + whole).sqrt().float()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if torch.isfinite(total):
        for g in grads:
            (g.to_local() if _is_sharded(g) else g).mul_(coef)
    return total


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole state dict with the model's own (HF) names, on every rank (a collective)."""
    out = {}
    for name, tensor in model.state_dict().items():
        out[name] = tensor.full_tensor() if _is_sharded(tensor) else tensor.detach()
    return out


def close_trainer_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
