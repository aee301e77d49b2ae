"""A Ray cluster for one run: started on this host for the run and stopped at its end, or joined
(`cluster.address`: 'auto' or HOST:PORT of a `ray start --head`) and left running.

Ray is imported here and in the role modules only: the local backend never needs it.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from parityrl.config import ClusterConfig, RoleResources
from parityrl.core.errors import UserError


FORWARDED_ENV = ("VLLM_", "PARITYRL_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_")


def where() -> dict:
    """The process a role runs in: host, node address, pid (for cluster.json)."""
    import ray

    node_ip = ray.util.get_node_ip_address() if ray.is_initialized() else None
    return {"host": socket.gethostname(), "node_ip": node_ip, "pid": os.getpid()}


def actor_options(resources: RoleResources) -> dict:
    """Ray actor options for one role's resources."""
    return {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
            "resources": dict(resources.custom)}


async def start_actor(role_cls: type, resources: RoleResources, *args):
    """An async actor of `role_cls` (concurrent calls) whose `start(*args)` has returned: its
    handle and what `start` returned; an actor whose start failed is killed. max_restarts=0: a
    dead role is replaced by the run, never restarted by Ray behind its back."""
    import ray

    actor = ray.remote(role_cls).options(max_concurrency=10_000, max_restarts=0,
                                         **actor_options(resources))
    handle = actor.remote()
    try:
        started = await handle.start.remote(*args)
    except BaseException:
        ray.kill(handle)
        raise
    return handle, started


class RayCluster:
    """`with RayCluster(cfg.cluster):` — Ray is up inside, and down after if this run started it."""

    def __init__(self, cluster: ClusterConfig, learned_rewards: bool = False) -> None:
        self.cluster = cluster
        self.learned_rewards = learned_rewards  # the run has a rewards actor to place too
        self.started_here = False

    def __enter__(self) -> "RayCluster":
        try:
            import ray
        except ImportError:
            raise UserError("cluster.backend=ray needs Ray: pip install 'ray>=2.60'") from None
        c, learned_rewards = self.cluster, self.learned_rewards
        # The roles' processes see this process's engine, model and logging settings on any node.
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        runtime_env = {"env_vars": env}
        if ray.is_initialized():  # e.g. a test session's cluster: join it, leave it running
            return self
        if c.address is None:
            # Logical CPUs: every actor gets its share even on a 2-core host (vLLM's workers are
            # bound to cores by cpu_threads_bind, not by Ray's accounting).
            need = (c.engines * c.resources.engine.num_cpus
                    + c.trainer_ranks * c.resources.trainer.num_cpus
                    + (c.resources.rewards.num_cpus if learned_rewards else 0))
            ray.init(num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
                     object_store_memory=c.object_store_mib << 20, include_dashboard=False,
                     logging_level="ERROR", runtime_env=runtime_env)
            self.started_here = True
        else:
            try:
                ray.init(address=c.address, logging_level="ERROR", runtime_env=runtime_env)
            except ConnectionError as e:
                raise UserError(f"cluster.address={c.address}: no Ray cluster there ({e}); "
                                "start one with `ray start --head`") from None
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self.started_here:
            ray.shutdown()


def write_cluster_json(run_dir: Path, cluster: ClusterConfig, roles: dict) -> Path:
    """Where each role of the run ran: `roles` maps a role name to `where()`-like dicts."""
    import ray

    path = run_dir / "cluster.json"
    info = {"backend": cluster.backend, "address": cluster.address,
            "ray_version": ray.__version__,
            "nodes": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}),
            "driver": where(), **roles}
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path
