"""Several trainer ranks: one torch.distributed group, the decoder layers sharded with FSDP2.

    dist = init_trainer_group(rank, world_size, address, port)   # gloo: the model is on the CPU
    trainer = Trainer(cfg, model, pad_id, dist=dist)               # shards the model itself
    weights = trainer.weights()                                    # whole, on every rank

FSDP2 (`fully_shard`) shards the parameters, gradients and optimizer state of the decoder
layers over the ranks (memory). With `cluster.split_batch` (the default) the batch is split too
(compute): every rank receives every group, takes its contiguous share of the rollouts
(`data_parallel_shares`) and scales its loss so that FSDP's average of the ranks' gradients is
the whole batch's gradient; a rank with fewer micro-batches runs empty backward passes to join
the others' collectives, and the per-token statistics are gathered back, so every rank reports
the whole batch's metrics. Without it every rank computes the whole batch, and the result does
not depend on the number of ranks beyond float32 rounding.
The embeddings, the final norm and the lm_head stay whole on every rank:
`token_logprobs` projects the decoder's hidden states with the lm_head weight itself (the fp32
projection), outside any module forward that FSDP could hook. Their gradients are averaged over
the ranks as FSDP averages the sharded ones, so every rank steps the same.

Every Trainer call that runs the model or reads its weights (accumulate, probe_parity,
score_exact, apply, weights, save_checkpoint) holds collectives: every rank makes the same calls,
in the same order, with the same data. parity.mode=bitwise is one rank only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class DistContext:
    """Which rank of how many this process is (the default process group's)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints and pushes weights."""
        return self.rank == 0


def init_trainer_group(rank: int, world_size: int, address: str, port: int,
                       backend: str = "gloo") -> DistContext:
    """Join the trainer ranks' default process group (TCP rendezvous at rank 0's address).

    gloo: the trainer's model lives on the CPU (nccl would need CUDA tensors)."""
    torch_dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                                  world_size=world_size)
    return DistContext(rank, world_size)


def shard_model(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """`fully_shard` each decoder layer; returns the parameters left whole (replicated).

    No `fully_shard` on the model itself: its embeddings and lm_head would become DTensors that
    `token_logprobs` reads outside a forward. So each layer is an FSDP root of its own, and a
    root keeps its parameters gathered from forward to backward unless told otherwise
    (`reshard_after_forward=None`): `True` frees them after each layer's forward, so at most
    one layer is whole at a time and it is gathered again for its backward.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer, reshard_after_forward=True)
    return [p for p in model.parameters() if not is_sharded(p)]


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor: the local shard of a parameter (or gradient) FSDP2 holds."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def data_parallel_shares(items: list, dist: DistContext) -> list[list]:
    """`items` cut into `dist.world_size` contiguous shares as even as possible (rank order);
    every rank computes all of them, so each knows how much work the others have."""
    n, world = len(items), dist.world_size
    return [items[n * r // world: n * (r + 1) // world] for r in range(world)]


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; a collective."""
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def average_replicated_grads(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of the whole (unsharded) parameters over the ranks, as FSDP2's
    reduce-scatter averages the sharded ones, so that every rank steps the same. A parameter
    one rank has no gradient for (its share never reached it) counts as zero there; one no rank
    has a gradient for keeps none, and AdamW leaves it alone as on one rank."""
    world = torch_dist.get_world_size()
    has = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)
    torch_dist.all_reduce(has, op=torch_dist.ReduceOp.MAX)
    for p, anyone in zip(params, has.tolist()):
        if not anyone:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch_dist.all_reduce(p.grad, op=torch_dist.ReduceOp.SUM)
        p.grad.div_(world)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (2-norm) over sharded and whole parameters together; a
    collective. The squares of each sharded gradient's local part are summed over the ranks,
    each whole gradient (the same on every rank, see `average_replicated_grads`) is counted
    once. Scales the gradients in place by min(1, max_norm / (norm + 1e-6)) as torch does, and
    leaves them alone when the norm is not finite (the step is skipped then). Returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    whole = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        if is_sharded(g):
            sharded += g.to_local().double().pow(2).sum()
        else:
            whole += g.double().pow(2).sum()
    torch_dist.all_reduce(sharded, op=torch_dist.ReduceOp.SUM)
    total = (sharded + whole).sqrt().float()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if torch.isfinite(total):
        for g in grads:
            (g.to_local() if is_sharded(g) else g).mul_(coef)
    return total.cpu()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: gathered from the ranks when sharded (a collective), else `t` detached."""
    return t.detach().full_tensor() if is_sharded(t) else t.detach()


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `whole` (the same on every rank), laid out as the DTensor `like`;
    no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.detach().to(like.device), like.device_mesh, like.placements,
                             src_data_rank=None)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict under the model's own (HF) names: the keys of
    `model.state_dict()` before `shard_model`, tied weights included under both names.

    A collective: every rank calls it, in the same order, and every rank gets the whole dict
    (the models trained here are small; rank 0 alone needs it to push or save). The sharded
    tensors are gathered copies; the whole ones share storage with the live parameters, as in
    `model.state_dict()`."""
    return {name: full_tensor(tensor) for name, tensor in model.state_dict().items()}

