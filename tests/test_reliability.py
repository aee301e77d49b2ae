"""Nothing hangs, nothing is lost: engine death, failing and hanging rewards, non-finite numbers,
a kill during a checkpoint write, impossible configurations."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (digit_share_config, kill_group, metric_rows, shm_of,
                     start_train, train_cmd, tree_of, wait_for_processes_gone, wait_gone,
                     wait_while_running, write_addition_rows)
from parityrl.config import build_config
from parityrl.runlog import read_metrics
from parityrl.shm_guard import engine_core_pids

pytestmark = pytest.mark.usefixtures("plugins_importable")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_addition_rows(tmp_path_factory.mktemp("task") / "prompts.jsonl")


def config(model: str, prompts: Path, **overrides) -> dict:
    return digit_share_config(model, prompts, **{"name": "rel", "checkpoint.every": 2,
                                                 **overrides})


def outcomes(run_dir: Path) -> dict[str, list[int]]:
    rows = read_metrics(run_dir / "problems.jsonl")
    return {kind: [i for r in rows for i in r[kind]] for kind in ("trained", "rejected", "dropped")}


def assert_each_index_once(run_dir: Path) -> int:
    done = outcomes(run_dir)
    position = int(read_metrics(run_dir / "metrics.jsonl")[-1]["data/position"])
    seen = [i for kind in done.values() for i in kind]
    assert len(seen) == len(set(seen)), "an index accounted for twice"
    assert set(range(position)) <= set(seen), sorted(set(range(position)) - set(seen))
    return position


# --- configurations the code cannot honour -----------------------------------------------------

@pytest.mark.parametrize("overrides, fragment", [
    (["mode=async", "sync_every=3", "actor.max_lag=1"], "sync_every=3 with actor.max_lag=1"),
    (["actor.group_size=1"], "group_size=1"),
    (["sampling.max_tokens=300", "engine.max_model_len=256"], "no room for a prompt"),
])
def test_impossible_configurations_are_refused_at_load(tmp_path, overrides, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    proc = subprocess.run(train_cmd(str(cfg), "--out", str(tmp_path / "run"), *overrides),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_predicted_not_to_fit_in_memory_is_refused_before_any_engine(
        tiny_model, prompts_file, tmp_path):
    """`train` refuses a config predicted not to fit before an engine starts, in one line naming
    the knob (exit 2); the plan behind it (`--plan`) lists each process's parts."""
    from parityrl.core.errors import UserError
    from parityrl.engine.process import ENGINE_START_LOG
    from parityrl.memory_plan import refuse_if_too_big
    from parityrl.pipeline import plan_run

    tree = config(tiny_model, prompts_file, **{"engine.kv_cache_gib": 4096})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    starts = tmp_path / "engine-starts.jsonl"
    run = subprocess.run(train_cmd(str(cfg), "--out", str(tmp_path / "run")),
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, ENGINE_START_LOG: str(starts)})
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-2000:]
    assert "lower engine.kv_cache_gib" in lines[0] and "predicted peak" in lines[0]
    assert not starts.exists(), "an engine started"
    plan = plan_run(build_config(tree), say=lambda m: None)
    table = plan.table()
    assert "KV cache (engine.kv_cache_gib)" in table and "largest micro-batch" in table
    assert plan.engines[0].parts_mb["KV cache (engine.kv_cache_gib)"] == 4096 * 1024
    with pytest.raises(UserError, match="lower engine.kv_cache_gib"):
        refuse_if_too_big(plan, build_config(tree))


# --- non-finite numbers never reach the weights ------------------------------------------------

def _rollouts(n: int):
    from parityrl.core.rollout import Rollout

    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        completion = torch.randint(3, 60, (5,), generator=gen).tolist()
        r = Rollout([5, 6, 7], completion, [-1.0] * 5, [0] * 5, "length", group_id=i // 2)
        r.reward = float(i % 2)
        out.append(r)
    return [out[i:i + 2] for i in range(0, n, 2)]


def test_a_nonfinite_engine_logprob_skips_its_sample_and_a_nonfinite_gradient_its_step(tiny_model):
    from parityrl.models.load import load_policy
    from parityrl.trainer.trainer import Trainer

    cfg = build_config({"model": tiny_model, "sampling": {"temperature": 1.0}})
    trainer = Trainer(cfg, load_policy(tiny_model), pad_id=0)
    groups = _rollouts(4)
    groups[0][0].logprobs[2] = float("nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.apply(trainer.accumulate(groups))
    assert metrics["rl/skipped_nonfinite"] == 1 and metrics["rl/skipped_nonfinite_step"] == 0
    assert all(v == v for v in metrics.values())  # nothing NaN among the metrics
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())

    # A non-finite gradient (whatever produced it) is not applied, and counted.
    state = trainer.accumulate(_rollouts(4))
    param = next(trainer.model.parameters())
    param.grad.view(-1)[0] = float("inf")
    unchanged = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.apply(state)
    assert metrics["rl/skipped_nonfinite_step"] == 1 and "rl/grad_norm" not in metrics
    assert trainer.nonfinite_streak == 1 and trainer.version == 2
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, unchanged[k]), k
    assert all(p.grad is None for p in trainer.model.parameters())  # not carried over
    trainer.apply(trainer.accumulate(_rollouts(4)))
    assert trainer.nonfinite_streak == 0


# --- engine death, a SIGKILL, a kill during a checkpoint write: `parityrl train` as a process -----
# The process is the point here (its process group, its exit code, /dev/shm, a resume after a
# SIGKILL): these runs start private engines. Each run meets several faults in turn.

@pytest.mark.slow
def test_a_run_through_every_process_fault_loses_and_repeats_no_step(
        tiny_model, prompts_file, tmp_path):
    """One `parityrl train` (async, 8 steps, a checkpoint every 2, the write of step 4's made
    slow) meets the faults in turn:
    1. after step 2 its engine core is SIGKILLed: it starts a new engine at the trainer's version
       and goes on;
    2. during step 4's checkpoint write its main process alone is SIGKILLed (as the OOM killer
       does): within 15 s its guardian has ended every process the run started and reclaimed
       what it held in /dev/shm and the temp dir; step 2's checkpoint is intact, and what
       --resume restores from it equals what was saved, tensor by tensor;
    3. `--resume` (no engine restart allowed now) goes on from step 2, in parity, each step
       once, the steps after the checkpoint done again;
    4. after step 5 its engine core dies: with no restart left it exits 1 with one error line,
       cleanly, and leaves nothing in /dev/shm;
    5. `--resume` once more, its engine never given the trainer's weights (an injected fault):
       it says what it waits for, on the console and in errors.log, within
       report_waits_after_s."""
    from safetensors.torch import load_file

    from parityrl.pipeline import set_up_run

    plain = config(tiny_model, prompts_file, max_steps=8)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(plain))
    run_dir = tmp_path / "run"
    proc = start_train(str(cfg_file), "--out", str(run_dir), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env={"PARITYRL_FAULT_CHECKPOINT_SLEEP": "4:60"})
    writing = run_dir / "checkpoints" / ".tmp-step-000004" / "model.safetensors"
    try:
        wait_while_running(proc, lambda: metric_rows(run_dir) >= 2)
        os.kill(engine_core_pids(proc.pid)[0], signal.SIGKILL)  # 1.
        wait_while_running(proc, writing.exists)
        held = shm_of(proc.pid)  # the weights file, multiprocessing's segments, the ipc folder
        run_pids = tree_of(proc.pid)  # the engine core, the resource tracker, the guardian
        os.kill(proc.pid, signal.SIGKILL)  # 2. the main process alone
        killed_at = time.time()
        proc.wait()
        # The guardian ends the run's tree (parityrl/shm_guard.py end_tree), then reclaims.
        left = wait_for_processes_gone(run_pids[1:], 15)
        assert not left, f"processes of the killed run still alive after 15 s: {left}"
        assert wait_gone(held, 15 - (time.time() - killed_at)) == set()
    finally:
        kill_group(proc)
    out, err = proc.communicate()
    assert "engine restart" in out + err
    # The weights file, what multiprocessing made for the engine (a semaphore; with
    # engine.executor=mp also vLLM's psm_ message queues), the folder of its ipc sockets.
    assert any("parityrl-weights-" in p for p in held), held
    assert any(os.path.basename(p).startswith(("psm_", "sem.")) for p in held), held
    assert any("parityrl-ipc-" in p for p in held), held
    before = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in before] == [1, 2, 3, 4] and before[-1]["engine/restarts"] == 1
    entries = [line for line in (run_dir / "errors.log").read_text().splitlines()
               if line.startswith("== ") and not line.startswith("== note")]  # notes: long waits
    assert entries[0].startswith("== engine_restart"), entries
    saved = run_dir / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        ".tmp-step-000004", "step-000002"]

    # What --resume restores equals what was saved, tensor by tensor.
    pipeline = asyncio.run(set_up_run(build_config(plain), run_dir, resume=True,
                                      say=lambda m: None))
    trainer = pipeline.trainer
    for name, tensor in load_file(str(saved / "model.safetensors")).items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
    opt_saved = load_file(str(saved / "optimizer.safetensors"))
    for key, value in opt_saved.items():
        _, pid, field = key.split(".", 2)
        assert torch.equal(trainer.optimizer.state_dict()["state"][int(pid)][field], value), key
    assert torch.equal(torch.get_rng_state(), load_file(str(saved / "rng.safetensors"))["torch_rng"])
    state = json.loads((saved / "state.json").read_text())
    assert trainer.version == 2 and pipeline.ledger.position == state["data_position"]

    # Far more steps than the first run's 8: the engine must still be needed when it is killed
    # after step 5. A step takes ~0.2 s here; with max_steps=8, and once (CI, both cores busy)
    # with 30, the resumed run had finished before the kill reached its engine and exited 0.
    resumed = start_train("--resume", str(run_dir), "actor.max_restarts=0", "max_steps=1000",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # 3.

    def step_5_done_again() -> bool:
        return any(r["step"] == 5 and r["time"] > killed_at
                   for r in read_metrics(run_dir / "metrics.jsonl"))

    try:
        wait_while_running(resumed, step_5_done_again)
        held = shm_of(resumed.pid)
        cores = engine_core_pids(resumed.pid)
        assert cores, "no engine-core process found"
        for pid in cores:  # 4.
            os.kill(pid, signal.SIGKILL)
        out, err = resumed.communicate(timeout=120)
    finally:
        kill_group(resumed)
    assert resumed.returncode == 1, (resumed.returncode, out[-2000:], err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors and "engine died" in errors[0], errors
    # A clean exit: no task left pending, no segment removed behind the resource tracker's back.
    for noise in ("Task was destroyed but it is pending", "resource_tracker"):
        assert noise not in err, err[-2000:]
    assert "rel step 5/1000" in out  # plain progress lines when stdout is no terminal
    assert wait_gone(held) == set()

    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(rows) + 1)) and len(rows) >= 5
    assert all(r["time"] < killed_at for r in rows if r["step"] <= 2)
    assert all(r["time"] > killed_at for r in rows if r["step"] > 2)
    assert assert_each_index_once(run_dir) >= 5 * 4
    # After the restart and after the resume the engine holds the trainer's weights: the
    # resumed steps sample with the restored weights (lag within max_lag) and in parity.
    assert all(r["lag/max"] <= 1 for r in rows)
    assert max(r.get("mismatch/max_abs_diff", 0.0) for r in rows) <= 1e-5

    # 5. A resumed run whose engine never gets the weights is stuck: never silently.
    errors_log = run_dir / "errors.log"
    # Only this run's notes: on a loaded machine the runs before may have waited > 30 s too.
    before = len(errors_log.read_text()) if errors_log.exists() else 0
    stuck = start_train("--resume", str(run_dir), "max_steps=1000", "report_waits_after_s=2",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        env={"PARITYRL_FAULT_SKIP_START_PUSH": "1"})
    try:
        wait_while_running(stuck, lambda: "groups of rollouts" in errors_log.read_text()[before:],
                           timeout=120)
    finally:
        kill_group(stuck)
    out, _ = stuck.communicate()
    note = next(line for line in errors_log.read_text()[before:].splitlines()
                if line.startswith("== note") and "groups of rollouts" in line)
    assert "groups of rollouts within actor.max_lag=1 of version" in note, note
    assert "(the engine is at version 0" in note and "were the trainer's weights pushed?" in note
    assert note.split(": ", 1)[1] in out  # said on the console too
    # Once per stall at most (none when the report came before the first round), not every round.
    assert out.count("exceeded max_lag; no step taken") <= 1


@pytest.mark.slow
def test_rewards_that_raise_or_hang_are_rejected_and_counted(tiny_model, prompts_file, tmp_path):
    from parityrl.pipeline import run_training
    from parityrl.tasks.registry import build_task

    cfg = build_config(config(tiny_model, prompts_file, mode="sync", max_steps=4,
                              **{"task.reward": "rewards:flaky", "task.reward_timeout_s": 2.0,
                                 "actor.prompts_per_step": 8, "actor.max_rejected_frac": 0.9}))
    messages: list[str] = []
    run_training(cfg, tmp_path, on_message=messages.append)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    done = outcomes(tmp_path)
    task = build_task(cfg.task)
    prompt = {i: task.train_problem(i).prompt for i in done["trained"] + done["rejected"]}
    assert sorted(done["rejected"]) == sorted(i for i, p in prompt.items()
                                              if p.startswith(("13", "17")))
    raised = sum(p.startswith("13") for i, p in prompt.items() if i in done["rejected"])
    hung = sum(p.startswith("17") for i, p in prompt.items() if i in done["rejected"])
    assert raised and hung
    assert rows[-1]["rollouts/rejected_reward_error"] == raised
    assert rows[-1]["rollouts/rejected_reward_timeout"] == hung
    log = (tmp_path / "errors.log").read_text()
    assert log.count("== reward_error") == 1 and log.count("== reward_timeout") == 1
    assert "ValueError: cannot score" in log
    assert sum("reward_error" in m for m in messages) == 1
    assert_each_index_once(tmp_path)


# --- disk faults -------------------------------------------------------------------------------

def test_an_unwritable_run_directory_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    proc = subprocess.run(train_cmd(str(cfg), "--out", str(blocker / "run")), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot write the run directory" in lines[0], proc.stderr


def test_a_run_directory_has_one_live_writer_and_a_dead_ones_lock_is_taken_over(tmp_path):
    """A live process holding a run directory (runlog.hold_run_dir) refuses a second writer with
    one line naming it, before anything is written; once it is SIGKILLed its lock is taken over."""
    import sys

    from parityrl.runlog import hold_run_dir

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from parityrl.runlog import hold_run_dir; hold_run_dir(Path(sys.argv[1])); "
         "print('held', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "config.yaml").write_text("name: x\nmax_steps: 4\n")
        before = sorted(p.name for p in tmp_path.iterdir())
        proc = subprocess.run(train_cmd("--resume", str(tmp_path)), capture_output=True,
                              text=True, timeout=60)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert f"being written by a live run (pid {holder.pid}," in lines[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()
    hold_run_dir(tmp_path)  # the dead holder's lock, taken over
    hold_run_dir(tmp_path)  # held already: this process is its writer
    assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()},")


@pytest.mark.slow
def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_one(
        tiny_model, prompts_file, tmp_path, monkeypatch):
    from parityrl.pipeline import RunStopped, run_training
    from parityrl.trainer.checkpoint import latest_checkpoint, load_checkpoint

    monkeypatch.setenv("PARITYRL_FAULT_CHECKPOINT_ERROR", "4")
    cfg = build_config(config(tiny_model, prompts_file, mode="sync", max_steps=6))
    with pytest.raises(RunStopped, match="cannot write checkpoint step 4: No space left"):
        run_training(cfg, tmp_path, on_message=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]
    from parityrl.models.load import load_policy

    model = load_policy(tiny_model)
    state = load_checkpoint(latest_checkpoint(tmp_path), model,
                            torch.optim.AdamW(model.parameters()))
    assert state.step == 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_prompt_that_cannot_fit_is_rejected_before_the_engine(tmp_path):
    import asyncio

    from parityrl.models.tiny import build_tokenizer
    from parityrl.rollouts.actor import Actor, ActorLimits, RunStopped
    from parityrl.core.sampling import SamplingConfig
    from parityrl.tasks.jsonl import JsonlConfig, JsonlTask

    rows = tmp_path / "r.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "x" * (100 + i), "answer": "1"}) + "\n"
                            for i in range(10)))
    task = JsonlTask(JsonlConfig(path=str(rows), eval_fraction=0, shuffle=False))
    errors: list[str] = []
    actor = Actor(engine=None, task=task, tokenizer=build_tokenizer(),
                  sampling=SamplingConfig(max_tokens=16), group_size=2, seed=0,
                  limits=ActorLimits(max_model_len=64, max_rejected_frac=0.5),
                  on_error=lambda kind, e: errors.append(kind))
    # Problem 0 (100 characters + 16 tokens > 64) never reaches the engine (there is none).
    groups = asyncio.run(actor.generate_batch(1))
    assert groups == [] and actor.rejected["too_long"] == 1 and errors == ["too_long"]
    assert actor.ledger.state() == {"position": 1, "done_above": []}
    assert actor.metrics()["rollouts/rejected_too_long"] == 1.0
    # From MIN_GROUPS (8) groups on, a rejected share above max_rejected_frac stops the run.
    for _ in range(6):
        asyncio.run(actor.generate_batch(1))
    with pytest.raises(RunStopped, match="100% of 8 groups were rejected.*too_long"):
        asyncio.run(actor.generate_batch(1))


def test_a_cancelled_actor_leaves_no_task_pending(tmp_path):
    """A run stops by cancelling the actor: nothing it started may stay pending (else asyncio
    prints "Task was destroyed but it is pending!" at exit)."""
    import asyncio

    from parityrl.models.tiny import build_tokenizer
    from parityrl.rollouts.actor import Actor, ActorLimits
    from parityrl.rollouts.stream import InProcessStream
    from parityrl.core.sampling import SamplingConfig
    from parityrl.tasks.jsonl import JsonlConfig, JsonlTask

    rows = tmp_path / "r.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    actor = Actor(engine=None, task=JsonlTask(JsonlConfig(path=str(rows), eval_fraction=0)),
                  tokenizer=build_tokenizer(), sampling=SamplingConfig(max_tokens=4),
                  group_size=2, seed=0, limits=ActorLimits(max_model_len=64))

    async def run_then_cancel() -> list:
        budget = asyncio.Semaphore(0)  # the actor waits for a slot, as when the trainer lags
        producer = asyncio.create_task(actor.run(InProcessStream(), budget))
        await asyncio.sleep(0.05)
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]

    assert asyncio.run(run_then_cancel()) == []
