"""The Ray backend end to end: engines and trainer ranks as Ray actors, one weight broadcast to
every engine, an engine actor killed mid-run and replaced.

The same run on the local backend is the reference: in sync mode with the same seed the first
step's loss and reward must match it, and the parity metrics stay at its level.

The Ray run's engines are private: they live in Ray actors (one is killed on purpose); the local
reference run takes the shared engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import digit_share_config, write_addition_rows
from parityrl.config import build_config
from parityrl.pipeline import run_training
from parityrl.models.load import load_policy
from parityrl.runlog import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("plugins_importable")]


def sync_config(model: str, prompts: Path, **overrides) -> dict:
    return digit_share_config(model, prompts, **{
        "name": "ray", "max_steps": 2, "mode": "sync", "sampling.max_tokens": 16,
        "actor.prompts_per_step": 6, "parity.fp64_reference": True,
        "engine.kv_cache_gib": 0.125, **overrides})


def test_two_engines_and_two_trainer_ranks_on_ray_match_local_and_survive_a_killed_engine(
        tiny_model, model_factory, tmp_path, ray_cluster):
    """Also rewarded by a reward model beside the task: on Ray it runs in an actor of its own
    (cluster/reward_role.py) and scores as the local run's does (the transformers backend here:
    the pooling engine is tests/test_rewards.py's)."""
    prompts = write_addition_rows(tmp_path / "prompts.jsonl")
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    rewards = {"models": [{"path": model_factory("reward"), "weight": 0.1,
                           "backend": "transformers"}]}
    run_training(build_config(sync_config(tiny_model, prompts, max_steps=1, rewards=rewards)),
                 local_dir, on_message=lambda m: None)
    (local,) = read_metrics(local_dir / "metrics.jsonl")

    killed: list[int] = []

    def kill_an_engine(step: int, metrics: dict) -> None:
        if step == 1:  # the next batch's requests meet a dead engine actor
            engines = json.loads((ray_dir / "cluster.json").read_text())["engines"]
            killed.append(engines[1]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    messages: list[str] = []
    # The session's cluster has 4 CPUs, all taken by the engines and ranks.
    cfg = sync_config(tiny_model, prompts, rewards=rewards,
                      cluster={"backend": "ray", "engines": 2, "trainer_ranks": 2,
                               "resources": {"rewards": {"num_cpus": 0}}})
    result = run_training(build_config(cfg), ray_dir, on_step=kill_an_engine,
                          on_message=messages.append)
    rows = read_metrics(ray_dir / "metrics.jsonl")
    assert result.steps == 2 and [r["step"] for r in rows] == [1, 2]

    # Same seed, sync mode: the first step is the local backend's step.
    assert rows[0]["rl/loss"] == pytest.approx(local["rl/loss"], abs=1e-5)
    assert rows[0]["rl/reward_mean"] == pytest.approx(local["rl/reward_mean"], abs=1e-5)
    assert rows[0]["reward/reward_model_0_mean"] == pytest.approx(
        local["reward/reward_model_0_mean"], abs=1e-5)
    assert local["rl/loss"] != 0 and rows[1]["rl/loss"] != rows[0]["rl/loss"]

    # Every update reached both engines and matched the trainer's digests there; the engines
    # sampled what the trainer scores (same-version tokens), at the local backend's level.
    assert [r["sync/engines_verified"] for r in rows] == [2.0, 2.0]
    for r in rows:
        assert r["mismatch/max_abs_diff"] <= max(1e-5, 2 * local["mismatch/max_abs_diff"])
    assert rows[-1]["engine/groups_served_0"] > 0 and rows[-1]["engine/groups_served_1"] > 0

    # The killed engine actor was replaced (once) and the run went on at the trainer's version.
    assert rows[-1]["engine/restarts"] == 1.0
    assert any("replaced, all at version 1" in m for m in messages), messages
    where = json.loads((ray_dir / "cluster.json").read_text())
    assert len(where["engines"]) == 2 and len(where["trainer_ranks"]) == 2
    assert where["rewards"]["pid"] not in {e["pid"] for e in where["engines"]}
    assert where["engines"][1]["pid"] != killed[0]
    assert {e["cpu_threads_bind"] for e in where["engines"]} == {"0", "1"}
    assert [r["rank"] for r in where["trainer_ranks"]] == [0, 1]
    # FSDP2: each rank holds half of the decoder layers (tests/test_distributed.py: the same
    # weights as one rank) and the whole embeddings, norm and head.
    whole = sum(p.numel() for p in load_policy(tiny_model).parameters())
    held = [r["parameters_held"] for r in where["trainer_ranks"]]
    assert held[0] == held[1] < whole
    assert (ray_dir / "checkpoints" / "step-000002" / "model.safetensors").exists()


def run_on_one_ray_engine(model: str, tmp_path, **overrides) -> tuple[list[dict], dict]:
    """A two-step sync run with its engine in a Ray actor: the metric rows and the resolved
    engine settings."""
    prompts = write_addition_rows(tmp_path / "prompts.jsonl")
    cfg = sync_config(model, prompts, cluster={"backend": "ray", "engines": 1}, **overrides)
    run_training(build_config(cfg), tmp_path / "run", on_message=lambda m: None)
    return (read_metrics(tmp_path / "run" / "metrics.jsonl"),
            json.loads((tmp_path / "run" / "engine_settings.json").read_text()))


def test_a_lora_run_on_a_ray_engine_pushes_the_adapter_through_the_actor(tiny_model, tmp_path,
                                                                         ray_cluster):
    """The adapter reaches an engine in a Ray actor (the actor writes its PEFT folder on its own
    node): verified on every step, parity at the local level."""
    rows, settings = run_on_one_ray_engine(tiny_model, tmp_path, **{
        "trainer.lora": {"rank": 8, "alpha": 16}, "trainer.optim.lr": 1e-2})
    assert [r["sync/engines_verified"] for r in rows] == [1.0, 1.0]
    assert all(r["mismatch/max_abs_diff"] <= 1e-5 for r in rows), rows
    assert settings["lora"]["max_lora_rank"] == 8


def test_a_moe_run_on_a_ray_engine_carries_routes_and_replays_them(model_factory, tmp_path,
                                                                   ray_cluster):
    """Mixture of experts through a Ray actor: the engine's routes travel with the rollouts,
    the trainer replays them (and scores the same tokens with its own routing), the per-expert
    weights are pushed and verified, and parity holds at the float32 level."""
    rows, settings = run_on_one_ray_engine(model_factory("qwen3-moe"), tmp_path, **{
        "trainer.moe_routing": "replay", "parity.compare_routing": True})
    assert [r["sync/engines_verified"] for r in rows] == [1.0, 1.0]
    assert all(r["mismatch/max_abs_diff"] <= 1e-5 for r in rows), rows
    assert all(r["mismatch/route_disagreement"] < 0.01 for r in rows), rows
    assert all(r["routing/recompute_max_abs_diff"] <= 1e-5 for r in rows), rows
    assert settings["routes_captured"] is True


def test_a_ray_engine_answers_the_engine_interface_as_local_engines_do(tiny_model, ray_cluster):
    """engine/interface.py: the driver's stand-in for an engine actor, alone in a gloo group of
    its own, passes the check every local engine kind passes (tests/test_weight_sync.py)."""
    import asyncio

    from helpers import check_engine_interface

    from parityrl.cluster.engine_role import RayEngine
    from parityrl.config import RoleResources
    from parityrl.engine.settings import EngineSettings

    async def scenario():
        engine = await RayEngine.start(EngineSettings(model=tiny_model, weight_transport="gloo"),
                                       RoleResources(), join_transfer=True)
        try:
            await check_engine_interface(engine, tiny_model)
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_a_ray_run_killed_at_its_driver_leaves_no_process_and_no_file(tiny_model, tmp_path):
    """`parityrl train` on a Ray cluster of its own, its driver alone SIGKILLed once its engine
    actor's engine runs: within 15 s no process of the run is left (Ray's, the actors', the
    engine core's, the guardians') and /dev/shm and the temp dir hold nothing of it. Ray's fate sharing ends the cluster it started, a worker whose owner died ends its
    children; the driver's guardian ends what is left of its tree, and each engine actor's
    guardian (a grandchild, which the worker's exit does not take along) reclaims the engine's
    files (docs/long-runs.md)."""
    from helpers import (kill_group, shm_of, start_train, tree_of, wait_for_processes_gone,
                         wait_gone, wait_while_running)
    from parityrl.shm_guard import _owned_folders, _pids, engine_core_pids

    prompts = write_addition_rows(tmp_path / "prompts.jsonl")
    cfg_file, run_dir = tmp_path / "run.yaml", tmp_path / "run"
    cfg_file.write_text(json.dumps(digit_share_config(tiny_model, prompts, **{
        "max_steps": 1000, "cluster.backend": "ray", "engine.kv_cache_gib": 0.125})))
    proc = start_train(str(cfg_file), "--out", str(run_dir), stderr=subprocess.PIPE)

    def engine_running() -> tuple | None:
        run_pids = tree_of(proc.pid)
        guardians = [p for p in _pids() if _guarded_root(p) in run_pids]
        held = shm_of(proc.pid) | _owned_folders(set(run_pids))  # with the temp dir's folders
        ready = (engine_core_pids(proc.pid) and len(guardians) == 2  # the driver's, the actor's
                 and any("parityrl-weights-" in p for p in held)
                 and any("parityrl-ipc-" in p for p in held))
        return (run_pids, guardians, held) if ready else None

    try:
        wait_while_running(proc, lambda: engine_running() is not None)
        time.sleep(1.0)  # the guardians poll every second: let them record what is held now
        run_pids, guardians, held = engine_running()
        assert any(b"raylet" in _cmdline(p) for p in run_pids)
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait()
        left = wait_for_processes_gone(run_pids[1:] + guardians, 15)
        assert not left, [(p, _cmdline(p)) for p in left]
        assert wait_gone(held, 15 - (time.time() - killed_at)) == set()
    finally:
        kill_group(proc)


def _guarded_root(pid: int) -> int | None:
    """The root PID a `python -m parityrl.shm_guard ROOT` process guards; None for others."""
    words = _cmdline(pid).split()
    return int(words[-1]) if words[-3:-1] == [b"-m", b"parityrl.shm_guard"] else None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    except OSError:
        return b""
