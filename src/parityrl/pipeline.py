"""Pipeline RL: the engine generates continuously, the trainer learns, weights flow back in flight.

    parityrl train configs/reference.yaml --out runs/ref

async mode: the actor keeps up to `max(max_lag, 1) * prompts_per_step` groups outstanding; the
trainer takes `prompts_per_step` finished groups, drops those staler than `max_lag`, takes one
optimizer step (in a worker thread, so the event loop keeps feeding the engine), then pushes its
weights into the running engine (pause → reload → resume; requests in flight are kept).
sync mode: generate a batch, train, push, repeat — the conventional baseline, on the same code.

A run: `set_up_run` builds its `RunContext` once (the model and its tokenizer, the trainer from
`start_trainer`, local or Ray, restored with --resume, the ledger, the task and its environment).
`Pipeline` starts the engine and the actor on it, opens the step logs (`RunLogs`), and steps.
A step (`Pipeline._train_step`) learns (accumulate, parity probe, float64 scoring), applies the
update and pushes the weights, keeps the ledger, and returns its metrics; `AfterStep` then runs,
in this order: the held-out evaluation (its accuracy joins the step's metrics), the metrics row,
the samples (and the zero-reward warning), the caller's `on_step`, the parity alarm, the
checkpoint.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from parityrl.cluster.engine_role import ray_engine_starter
from parityrl.cluster.ray_cluster import RayCluster, write_cluster_json
from parityrl.cluster.reward_role import RayLearnedRewards
from parityrl.cluster.trainer_role import RayTrainerGroup
from parityrl.config import RunConfig, engine_settings
from parityrl.core.errors import UserError
from parityrl.core.rollout import Group
from parityrl.engine.pool import EnginePool
from parityrl.hardware import bfloat16_warning
from parityrl.memory_plan import (MemoryPlan, longest_prompt, measured_peaks, plan_memory,
                                  refuse_if_too_big)
from parityrl.models.builtin import resolve_model
from parityrl.models.load import check_model_folder
from parityrl.models.policy import build_trainer, seed_process
from parityrl.models.tokenizer import load_tokenizer
from parityrl.plots import plot_run
from parityrl.rewards.learned import LearnedRewards
from parityrl.rewards.reward_model import check_reward_model_folder
from parityrl.rollouts.actor import Actor, ActorLimits, RunStopped, is_engine_death
from parityrl.rollouts.episode import EpisodeLimits
from parityrl.rollouts.evaluate import greedy_accuracy, sampled_pass_at_k
from parityrl.rollouts.ledger import Ledger
from parityrl.rollouts.stream import InProcessStream
from parityrl.runlog import ErrorLog, JsonlLog, MetricsWriter, hold_run_dir, write_run_files
from parityrl.shm_guard import ensure_guard
from parityrl.tasks.prompts import has_chat_template
from parityrl.tasks.registry import build_environment, build_task
from parityrl.trainer.checkpoint import latest_checkpoint
from parityrl.waits import Waits
from parityrl.weights.update import UpdateReport

if TYPE_CHECKING:
    from parityrl.core.sampling import SamplingConfig
    from parityrl.tasks.base import Task
    from parityrl.tasks.environment import Environment
    from parityrl.trainer.trainer import Trainer


def actor_limits(cfg: RunConfig) -> ActorLimits:
    a = cfg.actor
    return ActorLimits(max_model_len=cfg.engine.max_model_len,
                       request_timeout_s=a.request_timeout_s,
                       reward_timeout_s=cfg.task.reward_timeout_s,
                       max_rejected_frac=a.max_rejected_frac, max_restarts=a.max_restarts,
                       restart_window_s=a.restart_window_s)


ZERO_REWARD_WARN_STEPS = 3  # a reward of exactly 0 for this many first steps gets a warning


class ParityAlarm(RuntimeError):
    """The live mismatch exceeded `parity.alarm_kl_k3` and `parity.on_alarm` is "stop"."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    last_metrics: dict
    eval_before: float | None = None
    eval_after: float | None = None


def split_stale(groups: list[Group], version: int, max_lag: int) -> tuple[list[Group], list[Group]]:
    """Groups whose every token is at most `max_lag` versions old, and the groups that are not."""
    fresh = [g for g in groups if all(version - r.min_version <= max_lag for r in g)]
    stale = [g for g in groups if not all(version - r.min_version <= max_lag for r in g)]
    return fresh, stale


def parity_alarm(metrics: dict, cfg: RunConfig) -> str | None:
    value = metrics.get("mismatch/kl_k3")
    if cfg.parity.on_alarm == "ignore" or value is None or value != value:
        return None
    if value > cfg.parity.alarm_kl_k3:
        return (f"parity alarm: mismatch/kl_k3 = {value:.3g} > {cfg.parity.alarm_kl_k3:g} on "
                f"same-version tokens; the engine and the trainer disagree. Diagnose with "
                f"`parityrl doctor --model {cfg.model} --dtype {cfg.dtype} "
                f"--temperature {cfg.sampling.temperature}`")
    return None


# -- set-up: the run's context, built once ---------------------------------------------------------
@dataclass(frozen=True)
class RunContext:
    """What a run is set up with, built once by `set_up_run` before its engine starts."""

    cfg: RunConfig
    run_dir: Path
    say: Callable[[str], None]  # a line for the person running it (the console by default)
    model_dir: Path
    tokenizer: Any
    pad_id: int
    trainer: Trainer | RayTrainerGroup  # in this process, or the Ray ranks (cluster.backend)
    ledger: Ledger  # which problems are done: the data position, restored with --resume
    start_step: int  # the restored checkpoint's step; 0 for a new run
    task: Task
    env: Environment | None  # the multi-turn environment (cfg.env), or None
    errors: ErrorLog  # errors.log: the first traceback of each kind of failure
    waits: Waits  # says what the run waits for, once a wait passes cfg.report_waits_after_s
    # Every trainer call runs on this one thread (`on_trainer_thread`): glibc gives each thread
    # its own malloc arena, and each arena keeps its own high-water mark of freed memory, so
    # steps handed to whichever pool thread is free grew the process by a step's peak per
    # thread (SmolLM2 + LoRA, 4096-token micro-batches: 19.9 GB measured).
    trainer_thread: ThreadPoolExecutor

    async def on_trainer_thread(self, fn, *args):
        """`fn(*args)` on the trainer's thread, the event loop free meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(
            self.trainer_thread, functools.partial(fn, *args))

    def sampling(self) -> SamplingConfig:
        """The run's sampling, the tokenizer's end-of-sequence token among its stop tokens."""
        eos = self.tokenizer.eos_token_id
        stops = set(self.cfg.sampling.stop_token_ids) | ({eos} if eos is not None else set())
        return self.cfg.sampling.model_copy(update={"stop_token_ids": tuple(sorted(stops))})

    def close(self) -> None:
        self.waits.close()
        self.trainer_thread.shutdown()
        close_trainer(self.cfg, self.trainer)


async def set_up_run(cfg: RunConfig, run_dir: Path, resume: bool = False,
                     say: Callable[[str], None] = print) -> RunContext:
    """The model resolved and its tokenizer loaded, the trainer started (and with `resume`
    restored from the last checkpoint in `run_dir`), the task and its environment built."""
    check_learned_rewards(cfg, say)  # before anything starts
    errors = ErrorLog(run_dir / "errors.log", say)
    waits = Waits(say, errors.note, cfg.report_waits_after_s)
    model_dir = resolve_model(cfg.model, say=say)
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    where = "its Ray actors" if cfg.cluster.backend == "ray" else "this process"
    with waits.on(f"the trainer to start ({where}: {model_dir})"):
        trainer = await start_trainer(cfg, model_dir, pad_id)
    try:
        start_step, ledger = restore(trainer, run_dir, say) if resume else (0, Ledger())
        task = build_task(cfg.task)
        env = build_env(cfg, task, tokenizer)
    except BaseException:
        waits.close()
        close_trainer(cfg, trainer)
        raise
    return RunContext(cfg, run_dir, say, model_dir, tokenizer, pad_id, trainer, ledger,
                      start_step, task, env, errors, waits,
                      ThreadPoolExecutor(1, thread_name_prefix="parityrl-trainer"))


async def start_trainer(cfg: RunConfig, model_dir: str | Path,
                        pad_id: int) -> Trainer | RayTrainerGroup:
    """The run's trainer: built in this process (`cluster.backend: local`), or its ranks started
    as Ray actors (`ray`), each of which builds the same one (models/policy.py)."""
    if cfg.cluster.backend != "ray":
        return build_trainer(cfg, model_dir, pad_id)

    seed_process(cfg.seed)  # this process's share of what build_trainer seeds
    return await RayTrainerGroup.start(cfg, model_dir, pad_id)


def close_trainer(cfg: RunConfig, trainer) -> None:
    """The Ray trainer ranks stopped (a trainer in this process needs nothing)."""
    if cfg.cluster.backend == "ray":
        trainer.close()


def restore(trainer, run_dir: Path, say: Callable[[str], None]) -> tuple[int, Ledger]:
    """The last checkpoint of `run_dir` into `trainer`: its step, and its ledger."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}")
    state = trainer.restore(ckpt)
    ledger = Ledger(state.data_position, state.extra.get("done_above", []))
    say(f"resuming {run_dir} from step {state.step}")
    return state.step, ledger


def build_env(cfg: RunConfig, task: Task, tokenizer) -> Environment | None:
    if cfg.env is None:
        return None
    if not has_chat_template(tokenizer):
        raise UserError(f"env: multi-turn episodes render observations with the chat "
                        f"template, and {cfg.model} has none")
    return build_environment(cfg.env, task)


@dataclass
class RunLogs:
    """The step logs, opened once the engine runs (a run whose engine never started has none)."""

    writer: MetricsWriter  # metrics.jsonl, and TensorBoard
    problems: JsonlLog  # problems.jsonl: the ledger's outcomes of each step
    samples: JsonlLog  # samples.jsonl

    @classmethod
    def open(cls, run_dir: Path, tensorboard: bool, resume_step: int) -> RunLogs:
        return cls(MetricsWriter(run_dir, tensorboard, resume_step=resume_step),
                   JsonlLog(run_dir / "problems.jsonl", resume_step),
                   JsonlLog(run_dir / "samples.jsonl", resume_step))

    def close(self) -> None:
        self.writer.close()
        self.problems.close()
        self.samples.close()


# -- a step's data -------------------------------------------------------------------------------
@dataclass
class StepBatch:
    """What one step learns from: the groups taken, the samples dropped as too stale, when the
    round began (and the engine's busy seconds then), and in async mode the stream that holds the
    next groups (the parity probe's rollouts)."""

    groups: list[Group]
    dropped: int
    start: float
    busy_before: float
    stream: Any = None
    quiet: bool = False  # an empty round of a stall already reported: say nothing


@dataclass
class Stalled:
    """The async loop since its last optimizer step: since when, and the samples dropped as too
    stale meanwhile (what a wait report says)."""

    since: float  # time.time()
    dropped: int = 0


@dataclass
class Pushed:
    """A step's weight push: the engines' pause, how many verified the weights, or the death of
    the engine of `generation` it met (the step's bookkeeping replaces that engine)."""

    generation: int
    seconds: float = 0.0
    verified: int | None = None
    died: BaseException | None = None


@dataclass
class StepResult:
    step: int
    groups: list[Group]
    metrics: dict  # the after-step hooks may add to it (eval/accuracy) before it is written


# -- memory, known before the engines start ------------------------------------------------------
def run_memory_plan(ctx: RunContext) -> MemoryPlan | None:
    """The run's predicted peak memory per process (memory_plan.py); None when the trainer runs
    in Ray actors (not measured in this process)."""
    if ctx.cfg.cluster.backend == "ray":
        return None
    return plan_memory(ctx.cfg, ctx.trainer.model, longest_prompt(ctx.task, ctx.tokenizer))


def plan_run(cfg: RunConfig, say: Callable[[str], None] = print) -> MemoryPlan:
    """`parityrl train --plan`: the plan of a run of `cfg`, with its trainer built but no engine
    started and nothing written."""
    if cfg.cluster.backend == "ray":
        raise UserError("--plan: the memory of trainers in Ray actors is not predicted yet; "
                        "plan the same config with cluster.backend=local")
    model_dir = resolve_model(cfg.model, say=say)
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = build_trainer(cfg, model_dir, pad_id)
    return plan_memory(cfg, trainer.model, longest_prompt(build_task(cfg.task), tokenizer))


def check_memory(ctx: RunContext) -> MemoryPlan | None:
    """The plan, said in one line; a run predicted not to fit is refused."""
    plan = run_memory_plan(ctx)
    if plan is None:
        return None
    engines = sum(e.total_mb for e in plan.engines)
    available = "" if plan.available_mb is None else f" of {plan.available_mb / 1024:.1f} available"
    ctx.say(f"memory: predicted peak {plan.total_mb / 1024:.1f} GiB{available} (trainer "
            f"{plan.trainer.total_mb / 1024:.1f}, engines {engines / 1024:.1f}; parts: "
            f"parityrl train --plan)")
    refuse_if_too_big(plan, ctx.cfg)
    return plan


def write_memory_plan(run_dir: Path, plan: MemoryPlan | None, measured: bool) -> None:
    """memory.json: the plan, and with `measured` the peaks the processes reached."""
    import json

    if plan is None:
        return
    if measured:
        plan.measured_mb = measured_peaks()
    (run_dir / "memory.json").write_text(json.dumps(plan.as_dict(), indent=1) + "\n")


# -- the engines -----------------------------------------------------------------------------------
async def start_engines(ctx: RunContext) -> EnginePool:
    """The run's engines: one (engine/source.py), several in this process, or Ray actors; always
    one pool, so a restart never asks what kind of engine the run has. They hold the trainer's
    policy before the first request (resumed runs, LoRA: a LoRA engine generates only with an
    adapter)."""
    cfg, trainer = ctx.cfg, ctx.trainer
    starter = (ray_engine_starter(cfg.cluster.resources.engine) if cfg.cluster.backend == "ray"
               else None)
    count = cfg.cluster.engines
    with ctx.waits.on(f"{count} vLLM engine{'s' if count > 1 else ''} to start ({ctx.model_dir})"):
        engine = await EnginePool.start(engine_settings(cfg, ctx.model_dir), count, starter)
    try:
        if cfg.parity.mode == "bitwise":
            trainer.use_engine_kernels(engine.resolved_settings())
        if (ctx.start_step or trainer.lora is not None) and not _fault("SKIP_START_PUSH"):
            with ctx.waits.on(f"the engines to load the trainer's weights (version "
                              f"{trainer.version})"):
                await push_policy(trainer, engine, trainer.weights(), trainer.version)
    except BaseException:
        await engine.close()
        raise
    return engine


def check_learned_rewards(cfg: RunConfig, say: Callable[[str], None]) -> None:
    """Each reward model a sequence-classification folder, the judge a model folder: refused in
    one line before any engine starts (built-in ones built now, once)."""
    for m in cfg.rewards.models:
        check_reward_model_folder(resolve_model(m.path, say=say))
    if cfg.rewards.judge is not None:
        check_model_folder(resolve_model(cfg.rewards.judge.model, say=say))


async def start_learned_rewards(
        ctx: RunContext) -> LearnedRewards | RayLearnedRewards | None:
    """The run's reward models and judge, each on its own engine (rewards/), in this process or
    (Ray backend) in an actor of their own; None without."""
    rewards = ctx.cfg.rewards
    if not rewards.learned:
        return None
    with ctx.waits.on("the reward engines to start"):
        if ctx.cfg.cluster.backend == "ray":
            return await RayLearnedRewards.start(rewards, ctx.cfg.cluster.resources.rewards)
        return await LearnedRewards.start(rewards, lambda spec: resolve_model(spec, say=ctx.say),
                                          load_tokenizer)


def _fault(name: str) -> bool:
    """PARITYRL_FAULT_<name> is set: a fault the reliability tests inject on purpose."""
    import os

    return bool(os.environ.get(f"PARITYRL_FAULT_{name}"))


async def push_policy(trainer, engine: EnginePool, weights: dict, version: int) -> UpdateReport:
    """The trainer's policy into `engine`: every weight, or with LoRA the adapter only."""
    if trainer.lora is not None:
        return await engine.update_adapter(weights, trainer.lora, version=version)
    return await engine.update_weights(weights, version=version)


# -- the run ---------------------------------------------------------------------------------------
class Pipeline:
    """One run on its context: the engine, the actor that feeds the trainer, the step loop."""

    def __init__(self, ctx: RunContext, engine: EnginePool,
                 on_step: Callable[[int, dict], None] | None = None,
                 memory: MemoryPlan | None = None,
                 learned: LearnedRewards | RayLearnedRewards | None = None) -> None:
        cfg = ctx.cfg
        self.ctx = ctx
        self.memory = memory  # the predicted peaks, written with the measured ones to memory.json
        self.on_step = on_step or (lambda step, metrics: None)
        self.cfg, self.trainer = cfg, ctx.trainer  # short names for the context's two busiest
        self.weights_lock = asyncio.Lock()  # a restart reads weights no optimizer step is writing
        self.engine = engine  # the run's pool: `_restart_engine` replaces its engines in place
        self.actor = Actor(engine, ctx.task, ctx.tokenizer, ctx.sampling(), cfg.actor.group_size,
                           cfg.seed, actor_limits(cfg), ledger=ctx.ledger,
                           restart_engine=self._restart_engine, on_error=ctx.errors.record,
                           env=ctx.env, env_config=cfg.env, learned=learned,
                           task_weight=cfg.rewards.task_weight,
                           dynamic=cfg.actor.dynamic_sampling)
        self.learned = learned
        self.no_signal_before = 0  # the actor's count of dropped groups at the last step

    async def run(self) -> TrainResult:
        ctx = self.ctx
        logs = None
        try:
            write_run_files(ctx.run_dir, ctx.cfg, self.engine.resolved_settings(),
                            None if self.learned is None else self.learned.resolved_settings())
            write_memory_plan(ctx.run_dir, self.memory, measured=False)
            self._write_cluster_json(self.engine)
            logs = RunLogs.open(ctx.run_dir, ctx.cfg.tensorboard, ctx.start_step)
            before = await self._evaluate_before(logs.writer)
            after_step = AfterStep(ctx, logs, self._evaluate, self.on_step)
            if ctx.cfg.mode == "async":
                last = await self._run_async(logs, after_step)
            else:
                last = await self._run_sync(logs, after_step)
        finally:
            if logs is not None:
                logs.close()
            write_memory_plan(ctx.run_dir, self.memory, measured=True)  # engines still up
            if self.learned is not None:
                await self.learned.close()
            await self.engine.close()
        plot_run(ctx.run_dir)
        return TrainResult(ctx.run_dir, self.trainer.version, last, before,
                           last.get("eval/accuracy"))

    # -- the engine ------------------------------------------------------------------------------
    def _write_cluster_json(self, engine: EnginePool) -> None:
        if self.cfg.cluster.backend != "ray":
            return
        write_cluster_json(self.ctx.run_dir, self.cfg.cluster, {
            "engines": [e.where | {"cpu_threads_bind": e.settings.cpu_threads_bind}
                        for e in engine.engines],
            "trainer_ranks": self.trainer.where,
            **({"rewards": self.learned.where} if self.learned is not None else {})})

    async def _restart_engine(self) -> EnginePool:
        """The engines holding the trainer's current weights and version again: in a pool of
        several only the dead ones are replaced (the others keep their requests in flight);
        a lone engine, or a pool none of whose engines died (one is stuck), is replaced whole."""
        pool, version = self.engine, self.trainer.version
        dead = await pool.dead()
        partial = bool(dead) and pool.several
        if not partial:
            self.ctx.say(f"the vLLM engine died; starting a new one at version {version}")
        async with self.weights_lock:
            weights = await self.ctx.on_trainer_thread(self.trainer.weights)
            with self.ctx.waits.on(f"a replacement engine to start and load version {version}"):
                await pool.replace(dead if partial else list(range(len(pool.engines))), weights,
                                   version, self.trainer.lora)
            if self.cfg.parity.mode == "bitwise":
                self.trainer.use_engine_kernels(pool.resolved_settings())
        if partial:
            self.ctx.say(f"engine {', '.join(map(str, dead))} of the pool died; "
                            f"replaced, all at version {version}")
        self._write_cluster_json(pool)
        return pool

    # -- evaluation ------------------------------------------------------------------------------
    async def _evaluate(self) -> dict[str, float]:
        """The held-out metrics on the current engine: eval/accuracy (greedy), and with
        `eval_pass_k` eval/pass@k and eval/mean@n from n samples per problem (engine only: none
        reaches the actor, the ledger or the parity probe)."""
        ctx, cfg = self.ctx, self.cfg
        problems = ctx.task.eval_problems()[: cfg.eval_size]
        limits = None if cfg.env is None else EpisodeLimits(
            cfg.env.max_turns, cfg.engine.max_model_len, cfg.env.max_episode_tokens)
        with ctx.waits.on(f"the held-out evaluation ({len(problems)} problems)"):
            metrics = {"eval/accuracy": await greedy_accuracy(
                self.engine, ctx.task, ctx.tokenizer, problems, cfg.sampling.max_tokens,
                ctx.env, limits)}
            if cfg.eval_pass_k:
                metrics |= await sampled_pass_at_k(
                    self.engine, ctx.task, ctx.tokenizer, problems, ctx.sampling(),
                    cfg.eval_pass_k, cfg.eval_samples or max(cfg.eval_pass_k), cfg.seed,
                    ctx.env, limits)
        return metrics

    async def _evaluate_before(self, writer: MetricsWriter) -> float | None:
        """A new run's held-out accuracy before its first step (with `eval_every`); its other
        held-out metrics (pass@k) are written beside it."""
        if not self.cfg.eval_every or self.ctx.start_step:
            return None
        metrics = await self._evaluate()
        writer.write(0, metrics)
        before = metrics["eval/accuracy"]
        self.ctx.say(f"held-out greedy accuracy before training: {before:.3f}")
        return before

    # -- the loops -------------------------------------------------------------------------------
    async def _run_sync(self, logs: RunLogs, after_step: AfterStep) -> dict:
        actor, metrics = self.actor, {}
        while self.trainer.version < self.cfg.max_steps:
            start, busy_before = time.perf_counter(), actor.busy_seconds_now()
            with self.ctx.waits.on(lambda: f"the rollouts of step {self.trainer.version + 1} "
                                           f"(the engine at version {self.engine.version})"):
                groups = await actor.generate_batch(self.cfg.actor.prompts_per_step)
            metrics = await self._step(StepBatch(groups, 0, start, busy_before), logs,
                                       after_step)
        return metrics

    async def _run_async(self, logs: RunLogs, after_step: AfterStep) -> dict:
        a, actor = self.cfg.actor, self.actor
        budget = asyncio.Semaphore(a.max_groups_in_flight or max(a.max_lag, 1) * a.prompts_per_step)
        stream = InProcessStream(a.dynamic_sampling.stop_waiting_after(a.prompts_per_step))
        producer = asyncio.create_task(actor.run(stream, budget))
        metrics: dict = {}
        try:
            # Count optimizer steps, not rounds: a round whose groups were all too stale takes none.
            stalled = Stalled(time.time())
            while self.trainer.version < self.cfg.max_steps:
                start, busy_before = time.perf_counter(), actor.busy_seconds_now()
                with self.ctx.waits.on(lambda: self._rollout_wait(stalled), since=stalled.since):
                    groups = await self._next_groups(stream, budget, producer)
                fresh, stale = split_stale(groups, self.trainer.version, a.max_lag)
                for group in stale:
                    self.ctx.ledger.mark_group(group, "dropped")
                batch = StepBatch(fresh, sum(len(g) for g in stale), start, busy_before, stream)
                batch.quiet = stalled.dropped > 0  # said once per stall
                stalled.dropped += batch.dropped
                metrics = await self._step(batch, logs, after_step)
                if metrics:
                    stalled = Stalled(time.time())
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        return metrics

    def _rollout_wait(self, stalled: Stalled) -> str:
        """What the async loop waits for (a wait report): fresh rollouts, and why there are none."""
        lag, version = self.cfg.actor.max_lag, self.trainer.version
        text = (f"{self.cfg.actor.prompts_per_step} groups of rollouts within actor.max_lag={lag} "
                f"of version {version} (the engine is at version {self.engine.version}")
        if stalled.dropped:
            text += f"; {stalled.dropped} samples dropped as too stale since the last step"
        if version - self.engine.version > lag:
            text += "; the engine's weights are too old: were the trainer's weights pushed?"
        return text + ")"

    async def _next_groups(self, stream, budget, producer) -> list[Group]:
        getter = asyncio.create_task(stream.get(self.cfg.actor.prompts_per_step))
        await asyncio.wait({getter, producer}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():  # the actor died: surface its error instead of waiting forever
            getter.cancel()
            producer.result()
        groups = getter.result()
        for _ in groups:
            budget.release()
        return groups

    async def _probe_rollouts(self, stream) -> list:
        """Queued rollouts sampled entirely by the trainer's current weights.

        Waits up to `parity.probe_wait_s` for the first one: the next step needs those groups
        anyway, so the wait moves time around rather than adding it, and it makes the parity
        measurement independent of how fast the engine happens to be.
        """
        deadline = time.perf_counter() + self.cfg.parity.probe_wait_s
        while True:
            pure = [r for g in stream.peek() for r in g if self.trainer.has_parity_tokens(r)]
            if pure or time.perf_counter() >= deadline:
                return pure[: self.cfg.parity.probe_rollouts]
            await asyncio.sleep(0.005)

    # -- one step --------------------------------------------------------------------------------
    async def _step(self, batch: StepBatch, logs: RunLogs, after_step: AfterStep) -> dict:
        """One optimizer step on `batch`, then what follows a step: the step's metrics ({} when
        there was nothing to learn from)."""
        result = await self._train_step(batch, logs.problems)
        if result is None:
            return {}
        await after_step(result)
        return result.metrics

    async def _train_step(self, batch: StepBatch, problems: JsonlLog) -> StepResult | None:
        """Learn, apply and push, keep the books: the step and its metrics; None when every group
        was too stale or rejected."""
        if not batch.groups:  # nothing to learn from this round
            if not batch.quiet:
                self.ctx.say(f"all {batch.dropped} samples exceeded max_lag; no step taken"
                             if batch.dropped
                             else "every group of this round was rejected; no step taken")
            return None
        state, train_seconds = await self._learn(batch)
        async with self.weights_lock:
            apply_start = time.perf_counter()
            metrics = await self.ctx.on_trainer_thread(self.trainer.apply, state)
            train_seconds += time.perf_counter() - apply_start
            step = self.trainer.version
            pushed = await self._push_weights(step)
        await self._keep_books(step, batch.groups, pushed, problems)
        metrics |= self._step_metrics(batch, metrics, train_seconds, pushed)
        return StepResult(step, batch.groups, metrics)

    async def _learn(self, batch: StepBatch) -> tuple[Any, float]:
        """Forward and backward over the groups, the parity probe on the queued rollouts (async
        mode), the float64 scoring: the step's state, and the seconds the trainer worked."""
        trainer = self.trainer
        # The trainer's thread for the heavy phases: the event loop keeps feeding the engine.
        train_start = time.perf_counter()
        state = await self.ctx.on_trainer_thread(trainer.accumulate, batch.groups)
        train_seconds = time.perf_counter() - train_start
        if batch.stream is not None:  # rollouts queued for the next step, sampled by these weights
            probe = await self._probe_rollouts(batch.stream)
            probe_start = time.perf_counter()
            await self.ctx.on_trainer_thread(trainer.probe_parity, state, probe)
            train_seconds += time.perf_counter() - probe_start
        await self.ctx.on_trainer_thread(trainer.score_exact, state)
        return state, train_seconds

    async def _push_weights(self, step: int) -> Pushed:
        """Every `sync_every` steps the trainer's weights into the engine (under the weights lock,
        right after the update); an engine that dies meanwhile is noted, not raised."""
        actor = self.actor
        pushed = Pushed(generation=actor.engine_generation)
        if step % self.cfg.sync_every == 0:
            try:
                weights = await self.ctx.on_trainer_thread(self.trainer.weights)
                with self.ctx.waits.on(f"the engines to take version {step}"):
                    report = await push_policy(self.trainer, self.engine, weights, step)
                pushed.seconds, pushed.verified = report.pause_seconds, report.engines_verified
            except Exception as e:
                if not is_engine_death(e):
                    raise
                pushed.died = e
        return pushed

    async def _keep_books(self, step: int, groups: list[Group], pushed: Pushed,
                          problems: JsonlLog) -> None:
        """The groups trained on in the ledger and problems.jsonl, an engine that died during the
        push replaced, and the run stopped after too many non-finite steps in a row."""
        ledger, trainer, cfg = self.ctx.ledger, self.trainer, self.cfg
        for group in groups:
            ledger.mark_group(group, "trained")
        problems.write(step, ledger.flush())
        if pushed.died is not None:  # the replacement starts with these weights and this version
            await self.actor.replace_engine(pushed.generation, pushed.died)
        if trainer.nonfinite_streak >= cfg.trainer.max_nonfinite_steps:
            raise RunStopped(f"{trainer.nonfinite_streak} optimizer steps in a row had a "
                             "non-finite gradient and were not applied; diagnose with `parityrl "
                             f"doctor --model {cfg.model} --dtype {cfg.dtype}`")

    def _step_metrics(self, batch: StepBatch, trained: dict, train_seconds: float,
                      pushed: Pushed) -> dict:
        """The step's metrics beside the trainer's (`trained`): lag, sync, throughput, time, data
        position, the engine's and the actor's counters."""
        actor = self.actor
        elapsed = time.perf_counter() - batch.start
        samples = sum(len(g) for g in batch.groups)
        busy = actor.busy_seconds_now() - batch.busy_before
        return {
            "lag/dropped_samples": float(batch.dropped),
            "sync/seconds": pushed.seconds,
            # Engines whose received weights matched the trainer's digests (steps that pushed).
            **({"sync/engines_verified": float(pushed.verified)}
               if pushed.verified is not None else {}),
            "throughput/samples_per_s": samples / elapsed,
            "throughput/tokens_per_s": trained.get("rl/tokens_sampled", 0.0) / elapsed,
            "throughput/engine_idle_frac": max(0.0, 1.0 - busy / elapsed),
            "time/step_seconds": elapsed,
            # The trainer's own work: forward/backward, parity probe scoring, optimizer step.
            "time/train_seconds": train_seconds,
            "data/position": float(self.ctx.ledger.position),
            **self.engine.metrics(),
            **actor.metrics(),
            **self._no_signal_metrics(len(batch.groups)),
        }

    def _no_signal_metrics(self, trained_groups: int) -> dict:
        """Dynamic sampling: the groups dropped since the last step, and the generation they
        cost beside what was trained on (dropped ÷ trained groups)."""
        dynamic, actor = self.cfg.actor.dynamic_sampling, self.actor
        if not dynamic.enabled:
            return {}
        dropped, self.no_signal_before = (actor.no_signal - self.no_signal_before,
                                          actor.no_signal)
        cap = dynamic.dropped_at_cap(self.cfg.actor.prompts_per_step)
        if self.cfg.mode == "async" and dynamic.at_cap == "wait" and dropped > cap:
            self.ctx.errors.record("no_signal_cap", RuntimeError(
                f"{dropped} groups without signal dropped for one step (more than "
                f"actor.dynamic_sampling.max_draws={dynamic.max_draws:g} allows); at_cap=wait "
                "drew on"))
        return {"rl/groups_dropped_no_signal": float(dropped),
                "rl/generation_overdraw": dropped / max(trained_groups, 1)}


# -- after each step -------------------------------------------------------------------------------
class AfterStep:
    """What follows each optimizer step, in this order: the held-out evaluation (its accuracy
    joins the step's metrics before they are written), the metrics row, the samples, the caller's
    `on_step`, the parity alarm, the checkpoint. A failed write stops the run (`_disk`)."""

    def __init__(self, ctx: RunContext, logs: RunLogs,
                 evaluate: Callable[[], Awaitable[dict[str, float]]],
                 on_step: Callable[[int, dict], None]) -> None:
        self.ctx = ctx
        self.logs = logs
        self.evaluate_now = evaluate  # the held-out metrics (eval/...) on the current engine
        self.on_step = on_step
        self.samples = SampleLog(ctx.cfg, ctx.tokenizer, logs.samples, logs.writer, ctx.say)
        self.hooks: tuple[Callable[[StepResult], Awaitable[None]], ...] = (
            self.evaluate, self.write_metrics, self.log_samples, self.report, self.alarm,
            self.checkpoint)

    async def __call__(self, result: StepResult) -> None:
        for hook in self.hooks:
            await hook(result)

    async def evaluate(self, result: StepResult) -> None:
        cfg, step = self.ctx.cfg, result.step
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            result.metrics.update(await self.evaluate_now())

    async def write_metrics(self, result: StepResult) -> None:
        with _disk("metrics.jsonl"):
            self.logs.writer.write(result.step, result.metrics)

    async def log_samples(self, result: StepResult) -> None:
        with _disk("metrics.jsonl"):  # the wording of a failed metrics row
            self.samples(result.step, result.groups, result.metrics)

    async def report(self, result: StepResult) -> None:
        self.on_step(result.step, result.metrics)

    async def alarm(self, result: StepResult) -> None:
        cfg = self.ctx.cfg
        alarm = parity_alarm(result.metrics, cfg)
        if alarm:
            self.ctx.say(alarm)
            if cfg.parity.on_alarm == "stop":
                raise ParityAlarm(alarm)

    async def checkpoint(self, result: StepResult) -> None:
        ctx, step = self.ctx, result.step
        cfg, ledger = ctx.cfg, ctx.ledger
        if step % cfg.checkpoint.every == 0 or step == cfg.max_steps:
            with _disk(f"checkpoint step {step}"):
                await ctx.on_trainer_thread(
                    ctx.trainer.save_checkpoint, ctx.run_dir, step, ledger.position,
                    cfg.checkpoint.keep, {"done_above": ledger.state()["done_above"]})


class SampleLog:
    """Every `samples_every` steps (and the first) a few rollouts to samples.jsonl and TensorBoard's
    text tab; once, a warning when the reward was exactly 0 for the first ZERO_REWARD_WARN_STEPS
    steps."""

    def __init__(self, cfg: RunConfig, tokenizer, samples: JsonlLog, writer: MetricsWriter,
                 say: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.samples = samples
        self.writer = writer
        self.say = say
        self.zero_reward_steps = 0  # the first steps in a row with a reward of exactly 0

    def __call__(self, step: int, groups: list[Group], metrics: dict) -> None:
        cfg = self.cfg
        if cfg.samples_every and (step == 1 or step % cfg.samples_every == 0):
            rows = sample_rows(groups, self.tokenizer, cfg.samples_per_log)
            for row in rows:
                self.samples.write(step, row)
            self.writer.text(step, "samples", "\n\n".join(
                f"**{r['prompt']}** → `{r['completion']}` (reward {r['reward']}, answer "
                f"{r['answer']})" for r in rows))
        self.zero_reward_steps = (self.zero_reward_steps + 1
                                  if metrics.get("rl/reward_mean") == 0 else -10**9)
        if self.zero_reward_steps == ZERO_REWARD_WARN_STEPS:
            (row,) = sample_rows(groups, self.tokenizer, 1)
            self.say(f"the reward has been 0 for the first {ZERO_REWARD_WARN_STEPS} steps: "
                     f"{zero_reward_question(row)} A sample: {row['prompt']!r} → "
                     f"{row['completion']!r} (answer {row['answer']!r}"
                     + (f", the judge answered {row['judge_answer']!r}"
                        if row.get("judge_answer") is not None else "")
                     + "); more in samples.jsonl")


def zero_reward_question(row: dict) -> str:
    """What to check first: the prompt format, or (learned rewards) which source gives the 0."""
    learned = row.get("learned_rewards")
    if not learned:
        return "does the model understand the prompt format?"
    sources = ", ".join(f"{name} {value:g}" for name, value in learned.items())
    return (f"it is the learned rewards' ({sources}; the task's verified reward "
            f"{row.get('verified_reward', 0.0):g}, weighted by rewards.task_weight): does the "
            "judge or reward model read the answer as the task does?")


def sample_rows(groups: list[Group], tokenizer, count: int) -> list[dict]:
    """A few rollouts as a person reads them: one per group first, so prompts differ."""
    picked = [g[0] for g in groups[:count]]
    picked += [r for g in groups for r in g[1:]][: count - len(picked)]
    return [{"problem_index": r.group_id, "prompt": r.meta.get("prompt"),
             "completion": tokenizer.decode(r.completion_ids, skip_special_tokens=True),
             "answer": r.meta.get("answer"), "reward": r.reward,
             "versions": [r.min_version, r.max_version], "finish_reason": r.finish_reason,
             **({"conversation": [m for m in r.meta["messages"] if m["role"] != "system"]}
                if "messages" in r.meta else {}),
             **{k: r.meta[k] for k in ("verified_reward", "learned_rewards", "judge_answer")
                if k in r.meta}}
            for r in picked]


@contextmanager
def _disk(what: str):
    """A failed write stops the run with what failed (the last complete checkpoint stays)."""
    try:
        yield
    except OSError as e:
        raise RunStopped(f"cannot write {what}: {e.strerror or e}; the last complete "
                         "checkpoint is intact (resume from it with --resume)") from e


# -- entry points ----------------------------------------------------------------------------------
async def train(cfg: RunConfig, run_dir: Path, resume: bool = False,
                on_step: Callable[[int, dict], None] | None = None,
                say: Callable[[str], None] = print) -> TrainResult:
    """A run from its set-up to its last step (`cluster.backend: ray`: in its Ray cluster)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    hold_run_dir(run_dir)  # one live writer per run directory
    # Killed alone, this process leaves its engines, reward processes and the Ray cluster it
    # started to the guardian, which ends them and reclaims their files (shm_guard.py).
    ensure_guard()
    warning = bfloat16_warning(cfg.dtype)
    if warning:
        say(warning)
    if cfg.cluster.backend != "ray":
        return await _set_up_and_run(cfg, run_dir, resume, on_step, say)

    with RayCluster(cfg.cluster, learned_rewards=cfg.rewards.learned):
        return await _set_up_and_run(cfg, run_dir, resume, on_step, say)


async def _set_up_and_run(cfg: RunConfig, run_dir: Path, resume: bool, on_step,
                          say: Callable[[str], None]) -> TrainResult:
    ctx = await set_up_run(cfg, run_dir, resume, say)
    try:
        memory = check_memory(ctx)  # before any engine starts
        engine = await start_engines(ctx)
        try:
            learned = await start_learned_rewards(ctx)
        except BaseException:
            await engine.close()
            raise
        return await Pipeline(ctx, engine, on_step, memory, learned).run()
    finally:
        ctx.close()


def run_training(cfg: RunConfig, run_dir: Path, resume: bool = False, on_step=None,
                 on_message=print) -> TrainResult:
    return asyncio.run(train(cfg, run_dir, resume, on_step, on_message))
