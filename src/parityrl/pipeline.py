"""Pipeline RL: the engine generates continuously, the trainer learns, weights flow back in flight.

    parityrl train configs/reference.yaml --out runs/ref

async mode: the actor keeps up to `max(max_lag, 1) * prompts_per_step` groups outstanding; the
trainer takes `prompts_per_step` finished groups, drops those staler than `max_lag`, takes one
optimizer step (in a worker thread, so the event loop keeps feeding the engine), then pushes its
weights into the running engine (pause → reload → resume; requests in flight are kept).
sync mode: generate a batch, train, push, repeat — the conventional baseline, on the same code.
"""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from parityrl.config import RunConfig, engine_settings
from parityrl.core.errors import UserError
from parityrl.rollouts.actor import ActorLimits, RunStopped, is_engine_death
from parityrl.rollouts.ledger import Ledger
from parityrl.core.rollout import Group


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


class Pipeline:
    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False,
                 on_step: Callable[[int, dict], None] | None = None,
                 on_message: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.on_step = on_step or (lambda step, metrics: None)
        self.on_message = on_message

    # -- set-up ---------------------------------------------------------------------------------
    def _build_trainer(self):
        """The tokenizer, and the trainer in this process (`cluster.backend: local`)."""
        from parityrl.cluster.trainer_role import build_trainer
        from parityrl.trainer.checkpoint import latest_checkpoint

        self._load_tokenizer()
        self.trainer = build_trainer(self.cfg, self.model_dir, self.pad_id)
        self.start_step, self.ledger = 0, Ledger()
        if self.resume:
            self._restore(latest_checkpoint(self.run_dir))

    async def _build_ray_trainer(self):
        """The tokenizer here, the trainer ranks as Ray actors (`cluster.backend: ray`)."""
        from parityrl.cluster.trainer_role import RayTrainerGroup
        from parityrl.trainer.checkpoint import latest_checkpoint

        self._load_tokenizer()
        random.seed(self.cfg.seed)  # this process's share of what build_trainer seeds
        torch.manual_seed(self.cfg.seed)
        self.trainer = await RayTrainerGroup.start(self.cfg, self.model_dir, self.pad_id)
        self.start_step, self.ledger = 0, Ledger()
        if self.resume:
            self._restore(latest_checkpoint(self.run_dir))

    def _load_tokenizer(self) -> None:
        from parityrl.models.builtin import resolve_model
        from parityrl.models.tokenizer import load_tokenizer

        self.model_dir = resolve_model(self.cfg.model, say=self.on_message)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else 0)

    def _restore(self, ckpt: Path | None) -> None:
        if ckpt is None:
            raise UserError(f"nothing to resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        state = self.trainer.restore(ckpt)
        self.start_step = state.step
        self.ledger = Ledger(state.data_position, state.extra.get("done_above", []))
        self.on_message(f"resuming {self.run_dir} from step {state.step}")

    def _sampling(self):
        eos = self.tokenizer.eos_token_id
        stops = set(self.cfg.sampling.stop_token_ids) | ({eos} if eos is not None else set())
        return self.cfg.sampling.model_copy(update={"stop_token_ids": tuple(sorted(stops))})

    # -- the loop -------------------------------------------------------------------------------
    async def run(self) -> TrainResult:
        from parityrl.hardware import bfloat16_warning

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        warning = bfloat16_warning(cfg.dtype)
        if warning:
            self.on_message(warning)
        if cfg.cluster.backend == "ray":
            from parityrl.cluster.ray_cluster import RayCluster

            with RayCluster(cfg.cluster):
                try:
                    await self._build_ray_trainer()
                    return await self._run()
                finally:
                    if getattr(self, "trainer", None) is not None:
                        self.trainer.close()
        self._build_trainer()
        return await self._run()

    async def _run(self) -> TrainResult:
        from parityrl.plots import plot_run
        from parityrl.rollouts.actor import Actor
        from parityrl.runlog import ErrorLog, JsonlLog, MetricsWriter, write_run_files
        from parityrl.tasks.registry import build_task

        cfg = self.cfg
        task = build_task(cfg.task)
        self.env = self._build_env(task)
        limits = actor_limits(cfg)
        self.weights_lock = asyncio.Lock()  # a restart reads weights no optimizer step is writing
        self.errors = ErrorLog(self.run_dir / "errors.log", self.on_message)
        engine = await self._start_engine(push=bool(self.start_step))
        writer = None
        actor = Actor(engine, task, self.tokenizer, self._sampling(), cfg.actor.group_size,
                      cfg.seed, limits, ledger=self.ledger,
                      restart_engine=self._restart_engine, on_error=self.errors.record,
                      env=self.env, env_config=cfg.env)
        self.actor = actor
        try:
            write_run_files(self.run_dir, cfg, engine.resolved_settings())
            self._write_cluster_json(engine)
            writer = MetricsWriter(self.run_dir, cfg.tensorboard, resume_step=self.start_step)
            self.problems_log = JsonlLog(self.run_dir / "problems.jsonl", self.start_step)
            self.samples_log = JsonlLog(self.run_dir / "samples.jsonl", self.start_step)
            self.writer = writer
            self.zero_reward_steps = 0
            self._task = task
            before = None
            if cfg.eval_every and not self.start_step:
                before = await self._evaluate()
                writer.write(0, {"eval/accuracy": before})
                self.on_message(f"held-out greedy accuracy before training: {before:.3f}")
            if cfg.mode == "async":
                last = await self._run_async(actor, writer)
            else:
                last = await self._run_sync(actor, writer)
        finally:
            if writer is not None:
                writer.close()
                self.problems_log.close()
                self.samples_log.close()
            await actor.engine.close()
        plot_run(self.run_dir)
        return TrainResult(self.run_dir, self.trainer.version, last, before,
                           last.get("eval/accuracy"))

    async def _start_engine(self, push: bool):
        from parityrl.engine.pool import EnginePool
        from parityrl.engine.source import start_engine

        settings = engine_settings(self.cfg, self.model_dir)
        cluster = self.cfg.cluster
        if cluster.backend == "ray":
            from parityrl.cluster.engine_role import ray_engine_starter

            engine = await EnginePool.start(settings, cluster.engines,
                                            ray_engine_starter(cluster.resources.engine))
        elif cluster.engines > 1:
            engine = await EnginePool.start(settings, cluster.engines)
        else:
            engine = await start_engine(settings)
        if self.cfg.parity.mode == "bitwise":
            try:
                self.trainer.use_engine_kernels(engine.resolved_settings())
            except BaseException:
                await engine.close()
                raise
        # The trainer's weights, not the folder's (resume, restart); a LoRA engine always gets
        # the trainer's adapter before its first request (it generates with an adapter only).
        if push or self._lora is not None:
            try:
                await self._push(engine, self.trainer.weights(), self.trainer.version)
            except BaseException:
                await engine.close()
                raise
        return engine

    @property
    def _lora(self) -> dict | None:
        return getattr(self.trainer, "lora", None)

    async def _push(self, engine, weights: dict, version: int):
        """The trainer's policy into `engine`: every weight, or with LoRA the adapter only."""
        if self._lora is not None:
            return await engine.update_adapter(weights, self._lora, version=version)
        return await engine.update_weights(weights, version=version)

    def _write_cluster_json(self, engine) -> None:
        if self.cfg.cluster.backend != "ray":
            return
        from parityrl.cluster.ray_cluster import write_cluster_json

        write_cluster_json(self.run_dir, self.cfg.cluster, {
            "engines": [e.where | {"cpu_threads_bind": e.settings.cpu_threads_bind}
                        for e in engine.engines],
            "trainer_ranks": self.trainer.where})

    async def _restart_engine(self):
        """The engine holding the trainer's current weights and version again (one died or got
        stuck). In a pool only the dead engines are replaced; otherwise every engine is."""
        old = self.actor.engine
        if hasattr(old, "replace_dead"):
            async with self.weights_lock:
                weights = await asyncio.to_thread(self.trainer.weights)
                replaced = await old.replace_dead(weights, self.trainer.version, self._lora)
            if replaced:
                self.on_message(f"engine {', '.join(map(str, replaced))} of the pool died; "
                                f"replaced, all at version {self.trainer.version}")
                self._write_cluster_json(old)
                return old
        self.on_message(f"the vLLM engine died; starting a new one at version "
                        f"{self.trainer.version}")
        try:
            await old.close()
        except Exception:  # noqa: BLE001 - it is dead; what matters is the new one
            pass
        async with self.weights_lock:
            engine = await self._start_engine(push=True)
        self._write_cluster_json(engine)
        return engine

    def _build_env(self, task):
        from parityrl.tasks.registry import build_environment
        from parityrl.tasks.prompts import has_chat_template

        if self.cfg.env is None:
            return None
        if not has_chat_template(self.tokenizer):
            raise UserError(f"env: multi-turn episodes render observations with the chat "
                            f"template, and {self.cfg.model} has none")
        return build_environment(self.cfg.env, task)

    async def _evaluate(self) -> float:
        from parityrl.rollouts.episode import EpisodeLimits
        from parityrl.rollouts.evaluate import greedy_accuracy

        problems = self._task.eval_problems()[: self.cfg.eval_size]
        limits = None if self.cfg.env is None else EpisodeLimits(
            self.cfg.env.max_turns, self.cfg.engine.max_model_len, self.cfg.env.max_episode_tokens)
        return await greedy_accuracy(self.actor.engine, self._task, self.tokenizer, problems,
                                     self.cfg.sampling.max_tokens, self.env, limits)

    async def _run_sync(self, actor, writer) -> dict:
        metrics: dict = {}
        while self.trainer.version < self.cfg.max_steps:
            start = time.perf_counter()
            busy_before = actor.busy_seconds_now()
            groups = await actor.generate_batch(self.cfg.actor.prompts_per_step)
            metrics = await self._train_step(actor, writer, groups, 0, start, busy_before,
                                             stream=None)
        return metrics

    async def _run_async(self, actor, writer) -> dict:
        from parityrl.rollouts.stream import InProcessStream

        a = self.cfg.actor
        budget = asyncio.Semaphore(a.max_groups_in_flight or max(a.max_lag, 1) * a.prompts_per_step)
        stream = InProcessStream()
        producer = asyncio.create_task(actor.run(stream, budget))
        metrics: dict = {}
        try:
            # Count optimizer steps, not rounds: a round whose groups were all too stale takes none.
            while self.trainer.version < self.cfg.max_steps:
                start = time.perf_counter()
                busy_before = actor.busy_seconds_now()
                groups = await self._next_groups(stream, budget, producer)
                fresh, stale = split_stale(groups, self.trainer.version, a.max_lag)
                for group in stale:
                    self.ledger.mark(group[0].meta["problem_index"], "dropped")
                metrics = await self._train_step(actor, writer, fresh,
                                                 sum(len(g) for g in stale), start, busy_before,
                                                 stream)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        return metrics

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

    def _log_samples(self, step: int, groups: list[Group], metrics: dict) -> None:
        cfg = self.cfg
        if cfg.samples_every and (step == 1 or step % cfg.samples_every == 0):
            rows = sample_rows(groups, self.tokenizer, cfg.samples_per_log)
            for row in rows:
                self.samples_log.write(step, row)
            self.writer.text(step, "samples", "\n\n".join(
                f"**{r['prompt']}** → `{r['completion']}` (reward {r['reward']}, answer "
                f"{r['answer']})" for r in rows))
        self.zero_reward_steps = (self.zero_reward_steps + 1
                                  if metrics.get("rl/reward_mean") == 0 else -10**9)
        if self.zero_reward_steps == ZERO_REWARD_WARN_STEPS:
            (row,) = sample_rows(groups, self.tokenizer, 1)
            self.on_message(
                f"the reward has been 0 for the first {ZERO_REWARD_WARN_STEPS} steps: does the "
                f"model understand the prompt format? A sample: {row['prompt']!r} → "
                f"{row['completion']!r} (answer {row['answer']!r}); more in samples.jsonl")

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

    async def _train_step(self, actor, writer, groups, dropped, start, busy_before,
                          stream) -> dict:
        cfg = self.cfg
        if not groups:  # every group was too stale or rejected: nothing to learn from this round
            self.on_message(f"all {dropped} samples exceeded max_lag; no step taken" if dropped
                            else "every group of this round was rejected; no step taken")
            return {}
        trainer = self.trainer
        # Worker threads for the heavy phases: the event loop keeps feeding the engine meanwhile.
        train_start = time.perf_counter()
        state = await asyncio.to_thread(trainer.accumulate, groups)
        train_seconds = time.perf_counter() - train_start
        if stream is not None:  # rollouts queued for the next step, sampled by these weights
            probe = await self._probe_rollouts(stream)
            probe_start = time.perf_counter()
            await asyncio.to_thread(trainer.probe_parity, state, probe)
            train_seconds += time.perf_counter() - probe_start
        await asyncio.to_thread(trainer.score_exact, state)
        died: BaseException | None = None
        async with self.weights_lock:
            apply_start = time.perf_counter()
            metrics = await asyncio.to_thread(trainer.apply, state)
            train_seconds += time.perf_counter() - apply_start
            step = trainer.version
            sync_seconds, verified = 0.0, None
            generation = actor.engine_generation
            if step % cfg.sync_every == 0:
                try:
                    weights = await asyncio.to_thread(trainer.weights)
                    report = await self._push(actor.engine, weights, step)
                    sync_seconds, verified = report.pause_seconds, report.engines_verified
                except Exception as e:
                    if not is_engine_death(e):
                        raise
                    died = e
        for group in groups:
            self.ledger.mark(group[0].meta["problem_index"], "trained")
        self.problems_log.write(step, self.ledger.flush())
        if died is not None:  # the replacement starts with these weights and this version
            await actor.replace_engine(generation, died)
        if trainer.nonfinite_streak >= cfg.trainer.max_nonfinite_steps:
            raise RunStopped(f"{trainer.nonfinite_streak} optimizer steps in a row had a "
                             "non-finite gradient and were not applied; diagnose with `parityrl "
                             f"doctor --model {cfg.model} --dtype {cfg.dtype}`")
        elapsed = time.perf_counter() - start
        samples = sum(len(g) for g in groups)
        busy = actor.busy_seconds_now() - busy_before
        metrics |= {
            "lag/dropped_samples": float(dropped),
            "sync/seconds": sync_seconds,
            # Engines whose received weights matched the trainer's digests (steps that pushed).
            **({"sync/engines_verified": float(verified)} if verified is not None else {}),
            "throughput/samples_per_s": samples / elapsed,
            "throughput/tokens_per_s": metrics.get("rl/tokens", 0.0) / elapsed,
            "throughput/engine_idle_frac": max(0.0, 1.0 - busy / elapsed),
            "time/step_seconds": elapsed,
            # The trainer's own work: forward/backward, parity probe scoring, optimizer step.
            "time/train_seconds": train_seconds,
            "data/position": float(self.ledger.position),
            # Requests the engine preempted (count_preemptions; since the engine started).
            **({"engine/preemptions": float(actor.engine.preemption_counter.preemptions)}
               if actor.engine.preemption_counter is not None else {}),
            **actor.metrics(),
            # Several engines: the groups each one generated so far.
            **{f"engine/groups_served_{i}": float(n)
               for i, n in enumerate(getattr(actor.engine, "served", ()))},
        }
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            metrics["eval/accuracy"] = await self._evaluate()
        with _disk("metrics.jsonl"):
            writer.write(step, metrics)
            self._log_samples(step, groups, metrics)
        self.on_step(step, metrics)
        alarm = parity_alarm(metrics, cfg)
        if alarm:
            self.on_message(alarm)
            if cfg.parity.on_alarm == "stop":
                raise ParityAlarm(alarm)
        if step % cfg.checkpoint.every == 0 or step == cfg.max_steps:
            with _disk(f"checkpoint step {step}"):
                await asyncio.to_thread(
                    self.trainer.save_checkpoint, self.run_dir, step, self.ledger.position,
                    cfg.checkpoint.keep, {"done_above": self.ledger.state()["done_above"]})
        return metrics


def sample_rows(groups: list[Group], tokenizer, count: int) -> list[dict]:
    """A few rollouts as a person reads them: one per group first, so prompts differ."""
    picked = [g[0] for g in groups[:count]]
    picked += [r for g in groups for r in g[1:]][: count - len(picked)]
    return [{"problem_index": r.meta.get("problem_index"), "prompt": r.meta.get("prompt"),
             "completion": tokenizer.decode(r.completion_ids, skip_special_tokens=True),
             "answer": r.meta.get("answer"), "reward": r.reward,
             "versions": [r.min_version, r.max_version], "finish_reason": r.finish_reason,
             **({"conversation": [m for m in r.meta["messages"] if m["role"] != "system"]}
                if "messages" in r.meta else {})}
            for r in picked]


@contextmanager
def _disk(what: str):
    """A failed write stops the run with what failed (the last complete checkpoint stays)."""
    try:
        yield
    except OSError as e:
        raise RunStopped(f"cannot write {what}: {e.strerror or e}; the last complete "
                         "checkpoint is intact (resume from it with --resume)") from e


def run_training(cfg: RunConfig, run_dir: Path, resume: bool = False, on_step=None,
                 on_message=print) -> TrainResult:
    return asyncio.run(Pipeline(cfg, run_dir, resume, on_step, on_message).run())
