"""The Ray backend end to end: engines and trainer ranks as Ray actors, one weight broadcast to
every engine, an engine actor killed mid-run and replaced.

The same run on the local backend is the reference: in sync mode with the same seed the first
step's loss and reward must match it, and the parity metrics stay at its level.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import reward_fixtures_importable, with_overrides, write_addition_rows
from parityrl.config import build_config
from parityrl.pipeline import run_training
from parityrl.rollouts.types import Rollout
from parityrl.runlog import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def reward_module_importable():
    with pytest.MonkeyPatch.context() as mp:
        reward_fixtures_importable(mp)
        yield


def sync_config(model: str, prompts: Path, **overrides) -> dict:
    cfg = {
        "name": "ray", "seed": 0, "max_steps": 3, "mode": "sync", "model": model,
        "sampling": {"temperature": 0.7, "max_tokens": 24},
        # A dense reward (share of digits): advantages are non-zero from the first step.
        "task": {"type": "jsonl", "path": str(prompts), "reward": "rewards:digit_share"},
        "actor": {"group_size": 4, "prompts_per_step": 8},
        "trainer": {"optim": {"lr": 1e-3}},
        "parity": {"fp64_reference": True},
        "engine": {"max_model_len": 128, "kv_cache_gib": 0.125},
        "tensorboard": False,
    }
    return with_overrides(cfg, overrides)


def test_two_engines_and_two_trainer_ranks_on_ray_match_local_and_survive_a_killed_engine(
        tiny_model, tmp_path, ray_cluster):
    prompts = write_addition_rows(tmp_path / "prompts.jsonl")
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    run_training(build_config(sync_config(tiny_model, prompts, max_steps=1)), local_dir,
                 on_message=lambda m: None)
    (local,) = read_metrics(local_dir / "metrics.jsonl")

    killed: list[int] = []

    def kill_an_engine(step: int, metrics: dict) -> None:
        if step == 1:  # the next batch's requests meet a dead engine actor
            engines = json.loads((ray_dir / "cluster.json").read_text())["engines"]
            killed.append(engines[1]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    messages: list[str] = []
    cfg = sync_config(tiny_model, prompts,
                      cluster={"backend": "ray", "engines": 2, "trainer_ranks": 2})
    result = run_training(build_config(cfg), ray_dir, on_step=kill_an_engine,
                          on_message=messages.append)
    rows = read_metrics(ray_dir / "metrics.jsonl")
    assert result.steps == 3 and [r["step"] for r in rows] == [1, 2, 3]

    # Same seed, sync mode: the first step is the local backend's step.
    assert rows[0]["rl/loss"] == pytest.approx(local["rl/loss"], abs=1e-5)
    assert rows[0]["rl/reward_mean"] == pytest.approx(local["rl/reward_mean"], abs=1e-5)
    assert local["rl/loss"] != 0 and rows[1]["rl/loss"] != rows[0]["rl/loss"]

    # Every update reached both engines and matched the trainer's digests there; the engines
    # sampled what the trainer scores (same-version tokens), at the local backend's level.
    assert [r["sync/engines_verified"] for r in rows] == [2.0, 2.0, 2.0]
    for r in rows:
        assert r["mismatch/max_abs_diff"] <= max(1e-5, 2 * local["mismatch/max_abs_diff"])
    assert rows[-1]["engine/groups_served_0"] > 0 and rows[-1]["engine/groups_served_1"] > 0

    # The killed engine actor was replaced (once) and the run went on at the trainer's version.
    assert rows[-1]["engine/restarts"] == 1.0
    assert any("replaced, all at version 1" in m for m in messages), messages
    where = json.loads((ray_dir / "cluster.json").read_text())
    assert len(where["engines"]) == 2 and len(where["trainer_ranks"]) == 2
    assert where["engines"][1]["pid"] != killed[0]
    assert {e["cpu_threads_bind"] for e in where["engines"]} == {"0", "1"}
    assert [r["rank"] for r in where["trainer_ranks"]] == [0, 1]
    assert (ray_dir / "checkpoints" / "step-000003" / "model.safetensors").exists()


def synthetic_groups(step: int, count: int = 3, size: int = 4) -> list[list[Rollout]]:
    """Rollout groups with varied rewards and lengths, sampled (say) by version `step`."""
    out = []
    for g in range(count):
        group = []
        for j in range(size):
            gen = torch.Generator().manual_seed(100 * step + 10 * g + j)
            n = 3 + (g + j) % 4
            ids = torch.randint(4, 90, (n,), generator=gen).tolist()
            r = Rollout([5, 6, 7, 8], ids, [-1.0 - 0.1 * j] * n, [step] * n, "length",
                        group_id=g)
            r.reward = float((j + step) % 2)
            r.meta["problem_index"] = g
            group.append(r)
        out.append(group)
    return out


def test_fsdp2_on_two_ranks_steps_like_one_rank(tiny_model, ray_cluster):
    """Ray trainer ranks, FSDP2 over gloo: the same weights as one in-process trainer after 3
    steps, with the float64 reference and a parity probe on the way."""
    import asyncio

    from parityrl.cluster.trainer_role import RayTrainerGroup, build_trainer

    cfg = build_config({"model": tiny_model, "sampling": {"temperature": 1.0},
                        "parity": {"fp64_reference": True}, "trainer": {"optim": {"lr": 1e-2}},
                        "cluster": {"backend": "ray", "trainer_ranks": 2}})
    one = build_trainer(cfg, tiny_model, pad_id=0)
    two = asyncio.run(RayTrainerGroup.start(cfg, tiny_model, pad_id=0))
    try:
        for step in range(3):
            batch, probe = synthetic_groups(step), synthetic_groups(step, count=1)[0]
            metrics = []
            for trainer in (one, two):
                state = trainer.accumulate(batch)
                trainer.probe_parity(state, probe)
                trainer.score_exact(state)
                metrics.append(trainer.apply(state))
            for key in ("rl/loss", "rl/reward_mean", "rl/grad_norm",
                        "mismatch/precision_error_max"):
                assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-6, abs=1e-9), key
        whole, sharded = one.weights(), two.weights()
        assert whole.keys() == sharded.keys()
        moved = max((whole[k] - build_trainer(cfg, tiny_model, 0).weights()[k]).abs().max()
                    for k in ("model.layers.0.mlp.down_proj.weight",))
        assert moved > 1e-4  # the steps did change the weights
        assert max((whole[k] - sharded[k]).abs().max().item() for k in whole) <= 1e-6
        assert two.where[1]["pid"] != two.where[0]["pid"]
        # Each rank holds its half of the decoder layers and the whole embeddings/norm/head.
        layers = sum(p.numel() for n, p in one.model.named_parameters() if ".layers." in n)
        total = sum(p.numel() for p in one.model.parameters())
        assert [w["parameters_held"] for w in two.where] == [total - layers // 2] * 2
        print("max |Δ| 1 vs 2 ranks:", max((whole[k] - sharded[k]).abs().max().item()
                                             for k in whole))
    finally:
        two.close()
