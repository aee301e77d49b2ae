"""The trainer as Ray actors: `cluster.trainer_ranks` ranks of one torch.distributed (gloo) group.

    group = await RayTrainerGroup.start(cfg, model_dir, pad_id)
    state = group.accumulate(groups)     # every rank: forward + backward (FSDP2 beyond one rank)
    metrics = group.apply(state)         # every rank: the optimizer step; rank 0's metrics
    weights = group.weights()            # the full state dict (rank 0), for the engines

Each rank builds the same `Trainer` from the one RunConfig (models/policy.py `build_trainer`,
which the local backend calls in-process) and receives the whole batch: FSDP2 shards the
parameters, gradients and optimizer state over the ranks, and with `cluster.split_batch` each
rank computes its share of the batch (trainer/distributed.py).
The group answers the calls the pipeline makes on a local `Trainer`, so the step loop is one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from parityrl.cluster.ray_cluster import actor_options, where
from parityrl.config import RunConfig
from parityrl.core.rollout import Rollout
from parityrl.models.policy import build_trainer
from parityrl.trainer.distributed import init_trainer_group


class TrainerRank:
    """Inside one Ray actor: one rank, its Trainer, and the step in progress."""

    def setup(self, cfg: RunConfig, model_dir: str, pad_id: int, rank: int, world_size: int,
              address: str, port: int) -> dict:
        self.rank = rank
        dist = init_trainer_group(rank, world_size, address, port) if world_size > 1 else None
        self.trainer = build_trainer(cfg, model_dir, pad_id, dist)
        self.state = None
        # What this rank holds of the model: its shards and the whole (replicated) tensors.
        held = sum(getattr(p, "_local_tensor", p).numel() for p in self.trainer.params)
        return where() | {"rank": rank, "torch_threads": torch.get_num_threads(),
                          "parameters_held": held}

    def accumulate(self, groups: list) -> None:
        self.state = self.trainer.accumulate(groups)

    def probe_parity(self, rollouts: list[Rollout]) -> None:
        self.trainer.probe_parity(self.state, rollouts)

    def score_exact(self) -> None:
        self.trainer.score_exact(self.state)

    def apply(self) -> tuple[dict, int]:
        metrics = self.trainer.apply(self.state)
        self.state = None
        return metrics, self.trainer.nonfinite_streak

    def weights(self) -> dict[str, torch.Tensor] | None:
        """Every rank takes part (a collective with several ranks); rank 0 returns them."""
        weights = self.trainer.weights()
        return weights if self.rank == 0 else None

    def save_checkpoint(self, run_dir: str, step: int, data_position: int, keep: int,
                        extra: dict) -> None:
        self.trainer.save_checkpoint(Path(run_dir), step, data_position, keep, extra)

    def restore(self, folder: str):
        return self.trainer.restore(Path(folder))


class RayTrainerGroup:
    """The driver's handle on the ranks: the calls of a local Trainer the pipeline makes."""

    def __init__(self, ranks: list, where: list[dict]) -> None:
        self.ranks = ranks
        self.where = where
        self.version = 0  # optimizer steps taken (every rank holds the same)
        self.nonfinite_streak = 0
        self.lora: dict | None = None  # the adapter's settings: `weights` is then the adapter

    @classmethod
    async def start(cls, cfg: RunConfig, model_dir: str | Path, pad_id: int) -> "RayTrainerGroup":
        import ray

        from parityrl.weights.gloo import free_port  # weights/gloo.py imports vLLM

        world = cfg.cluster.trainer_ranks
        actor = ray.remote(TrainerRank).options(max_restarts=0,
                                                **actor_options(cfg.cluster.resources.trainer))
        ranks = [actor.remote() for _ in range(world)]
        # Rank 0's host is the rendezvous: ask it for its address and a free port there.
        address = await ranks[0].__ray_call__.remote(lambda self: ray.util.get_node_ip_address())
        port = await ranks[0].__ray_call__.remote(lambda self, a: free_port(a), address)
        try:
            where = await asyncio.gather(*(
                r.setup.remote(cfg, str(model_dir), pad_id, i, world, address, port)
                for i, r in enumerate(ranks)))
            lora = await ranks[0].__ray_call__.remote(lambda self: self.trainer.lora)
        except BaseException:
            for r in ranks:
                ray.kill(r)
            raise
        group = cls(ranks, list(where))
        group.lora = lora
        return group

    def _all(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(r, method).remote(*args) for r in self.ranks])

    # -- the calls the pipeline makes (from worker threads: they block) ---------------------------
    def accumulate(self, groups: list) -> "RayTrainerGroup":
        self._all("accumulate", groups)
        return self  # the step's state stays in the ranks

    def probe_parity(self, state, rollouts: list[Rollout]) -> None:
        self._all("probe_parity", rollouts)

    def score_exact(self, state) -> None:
        self._all("score_exact")

    def apply(self, state) -> dict[str, float]:
        (metrics, self.nonfinite_streak), *_ = self._all("apply")
        self.version += 1
        return metrics

    def has_parity_tokens(self, rollout: Rollout) -> bool:
        return any(rollout.parity_mask(self.version))

    def weights(self) -> dict[str, torch.Tensor]:
        return self._all("weights")[0]

    def save_checkpoint(self, run_dir: Path, step: int, data_position: int, keep: int,
                        extra: dict) -> None:
        self._all("save_checkpoint", str(run_dir), step, data_position, keep, extra)

    def restore(self, folder: Path):
        state = self._all("restore", str(folder))[0]
        self.version = state.step
        return state

    def close(self) -> None:
        import ray

        for r in self.ranks:
            ray.kill(r)
