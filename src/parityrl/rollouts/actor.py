"""The actor: problems → engine → scored rollout groups → stream.

In async mode it keeps generating while the trainer trains, bounded by a budget of outstanding
groups (in flight + queued) so that samples do not grow staler than `max_lag` allows. In sync mode
the pipeline asks it for exactly one batch at a time.

Nothing is lost silently. A group whose prompt cannot fit, whose reward function raises or hangs,
or whose request the engine refuses is *rejected*: counted by kind, its budget slot released, its
first traceback of each kind handed to `on_error`. When the engine itself dies (its engine-core
process gone, or a request past `request_timeout_s`), every group in flight waits while one of
them has a new engine started (`restart_engine`, which also pushes the trainer's weights), then
generates again for the same problem index: no index is skipped, none is trained on twice.

With an environment, each sample of a group is a multi-turn episode (rollouts/episode.py); an
environment that raises or hangs rejects its group like a reward function does.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable

from parityrl.engine.interface import Engine
from parityrl.rollouts.dynamic_sampling import DynamicSamplingConfig, has_signal
from parityrl.rollouts.episode import EnvProtocolError, EpisodeLimits, run_episode
from parityrl.rollouts.ledger import Ledger
from parityrl.rollouts.stream import RolloutStream
from parityrl.rewards.learned import LearnedRewards, RewardEnginesDied, RewardRejected
from parityrl.core.rollout import Group, Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.tasks.base import Problem, Task
from parityrl.tasks.environment import EnvConfig, Environment, EnvReply
from parityrl.tasks.prompts import encode_problem, encode_prompt

REJECTION_KINDS = ("too_long", "reward_error", "reward_timeout", "engine", "env_error",
                   "env_timeout", "judge_timeout", "judge_unparseable")


class GroupRejected(Exception):
    def __init__(self, kind: str, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.cause = cause


class RunStopped(RuntimeError):
    """The actor cannot go on: too many rejections, or the engine keeps dying."""


@dataclass
class ActorLimits:
    max_model_len: int
    request_timeout_s: float | None = None  # a request running longer means a stuck engine
    reward_timeout_s: float | None = None
    max_rejected_frac: float = 0.5  # over the run, once at least MIN_GROUPS groups are done
    max_restarts: int = 3  # engine restarts allowed within restart_window_s
    restart_window_s: float = 600.0


MIN_GROUPS = 8  # the rejected share is judged from this many finished groups on


def is_engine_death(error: BaseException) -> bool:
    """A dead or stuck engine: vLLM's engine core died, a call timed out, or (Ray backend) the
    engine's actor is gone."""
    import sys

    from vllm.v1.engine.exceptions import EngineDeadError

    ray = sys.modules.get("ray")  # only a Ray run has imported it
    actor_died = ray is not None and isinstance(error, ray.exceptions.RayActorError)
    return actor_died or isinstance(error, (EngineDeadError, asyncio.TimeoutError))


async def call_with_timeout(fn, *args, timeout: float | None):
    """`fn(*args)` in a daemon thread: a hung user function can neither block the event loop nor
    keep the process alive at exit. asyncio.TimeoutError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(error: BaseException | None, result=None) -> None:
        if future.done():  # timed out and cancelled already
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, error)
        else:
            loop.call_soon_threadsafe(settle, None, result)

    threading.Thread(target=work, daemon=True, name="parityrl-reward").start()
    return await asyncio.wait_for(future, timeout)


class Actor:
    def __init__(self, engine: Engine, task: Task, tokenizer, sampling: SamplingConfig,
                 group_size: int, seed: int, limits: ActorLimits, ledger: Ledger | None = None,
                 restart_engine: Callable[[], Awaitable[Engine]] | None = None,
                 on_error: Callable[[str, BaseException], None] = lambda kind, e: None,
                 env: Environment | None = None, env_config: EnvConfig | None = None,
                 learned: LearnedRewards | None = None, task_weight: float = 1.0,
                 dynamic: DynamicSamplingConfig | None = None) -> None:
        self.engine = engine
        self.task = task
        self.learned = learned  # reward models, a judge: scored after the task's reward
        self.task_weight = task_weight
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.group_size = group_size
        self.seed = seed
        self.limits = limits
        self.restart_engine = restart_engine
        self.on_error = on_error
        self.env = env
        self.env_config = env_config or EnvConfig()
        self.template_mismatches = 0  # episodes whose chat-template rendering differs
        self.ledger = ledger or Ledger()  # which problems are done; the data position
        self.engine_busy_seconds = 0.0  # wall time with at least one group in flight
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.dynamic = dynamic or DynamicSamplingConfig()
        self.no_signal = 0  # groups dropped by dynamic sampling (all rewards equal)
        self.restarts: list[float] = []  # monotonic times of engine restarts
        # Seconds from noticing an engine's death to the first rollout of its replacement.
        self.recoveries: list[float] = []
        self._noticed_death: float | None = None
        self._engine_generation = 0
        self._recovery = asyncio.Lock()
        self._in_flight = 0
        self._busy_since: float | None = None

    def decode(self, rollout: Rollout) -> str:
        return self.tokenizer.decode(rollout.completion_ids, skip_special_tokens=True)

    # -- one group --------------------------------------------------------------------------------
    async def generate_group(self, index: int) -> Group:
        """The scored group of training problem `index`; GroupRejected if it cannot be had."""
        problem = self.task.train_problem(index)
        if self.env is None:
            prompt_ids = encode_problem(self.tokenizer, problem)
        else:
            try:
                messages = self.env.start(problem)
            except Exception as e:
                raise GroupRejected("env_error", f"problem {index}: the environment's start "
                                                 f"raised {type(e).__name__}: {e}", e) from e
            prompt_ids = encode_prompt(self.tokenizer, messages, chat_template=True)
        if len(prompt_ids) + self.sampling.max_tokens > self.limits.max_model_len:
            raise GroupRejected("too_long", f"problem {index}: {len(prompt_ids)} prompt tokens + "
                                            f"max_tokens {self.sampling.max_tokens} > "
                                            f"max_model_len {self.limits.max_model_len}")
        seed = self.seed * 1_000_003 + index * self.group_size
        self._enter()
        start = time.perf_counter()
        try:
            if self.env is None:
                group = await self._sample(index, prompt_ids, self.sampling, self.group_size, seed)
            else:
                group = await self._episodes(index, problem, messages, seed)
        finally:
            self._leave()
        seconds = time.perf_counter() - start
        if self.env is None:
            await self._score(index, problem, group)
        for rollout in group:
            rollout.group_id = index  # the ledger's problem index
            rollout.meta.update(prompt=problem.prompt, answer=problem.answer,
                                generate_seconds=seconds)
        return group

    async def _episodes(self, index: int, problem: Problem, messages: list[dict],
                        seed: int) -> Group:
        """`group_size` episodes of one problem side by side; a failure cancels the others."""
        limits = EpisodeLimits(self.env_config.max_turns, self.limits.max_model_len,
                               self.env_config.max_episode_tokens)

        async def generate(ids: list[int], sampling: SamplingConfig, seed: int) -> Rollout:
            (rollout,) = await self._sample(index, ids, sampling, 1, seed)
            return rollout

        async def respond(conversation: list[dict], last_turn: bool) -> EnvReply:
            timeout = self.env_config.timeout_s
            try:
                return await call_with_timeout(self.env.respond, problem, conversation, last_turn,
                                               timeout=timeout)
            except asyncio.TimeoutError as e:
                raise GroupRejected("env_timeout", f"problem {index}: the environment took more "
                                                   f"than {timeout} s to reply", e) from None
            except Exception as e:
                raise GroupRejected("env_error", f"problem {index}: the environment raised "
                                                 f"{type(e).__name__}: {e}", e) from e

        tasks = [asyncio.ensure_future(run_episode(generate, respond, self.tokenizer, messages,
                                                   self.sampling, limits, seed + j))
                 for j in range(self.group_size)]
        try:
            group = list(await asyncio.gather(*tasks))
        except BaseException as e:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(e, EnvProtocolError):
                raise GroupRejected("env_error", f"problem {index}: {e}", e) from e
            raise
        for rollout in group:
            finding = rollout.template_mismatch
            if finding is None:
                continue
            self.template_mismatches += 1
            message = (f"problem {index}: rendering the episode with the chat template gives "
                       f"other token ids than the engine saw: {finding}")
            if self.env_config.on_template_mismatch == "refuse":
                raise RunStopped(message + " (env.on_template_mismatch=refuse)")
            self.on_error("template_mismatch", RuntimeError(message))
        return group

    async def _sample(self, index: int, prompt_ids: list[int], sampling: SamplingConfig, n: int,
                      seed: int) -> Group:
        from vllm.v1.engine.exceptions import EngineGenerateError

        while True:
            engine, generation = self.engine, self._engine_generation
            try:
                group = await asyncio.wait_for(
                    engine.generate(prompt_ids, sampling, n=n, seed=seed, group_id=index),
                    self.limits.request_timeout_s)
                if self._noticed_death is not None and generation == self._engine_generation:
                    self.recoveries.append(time.monotonic() - self._noticed_death)
                    self._noticed_death = None
                return group
            except EngineGenerateError as e:  # this request failed; the engine lives on
                raise GroupRejected("engine", f"problem {index}: the engine refused the request "
                                              f"({e.__cause__ or e})", e) from e
            except Exception as e:
                if not is_engine_death(e):
                    raise
                await self._recover(generation, e)

    async def _score(self, index: int, problem: Problem, group: Group) -> None:
        """Each rollout's reward: the task's (verifiable) reward, and with learned rewards
        task_weight × it + their weighted scores; each part kept in the rollout's meta."""
        completions = [self.decode(r) for r in group]
        verified = await self._rewards(index, problem, completions,
                                       [r.completion_ids for r in group])
        if self.learned is None:
            for rollout, reward in zip(group, verified):
                rollout.reward = reward
            return
        try:
            scores, judge_answers = await self.learned.score(problem, completions)
        except RewardRejected as e:
            raise GroupRejected(e.kind, f"problem {index}: {e}", e) from None
        except RewardEnginesDied as e:
            raise RunStopped(str(e)) from e
        except Exception as e:
            raise GroupRejected("reward_error", f"problem {index}: a learned reward raised "
                                                f"{type(e).__name__}: {e}", e) from e
        learned = self.learned.combine(scores)
        for j, rollout in enumerate(group):
            rollout.reward = self.task_weight * verified[j] + learned[j]
            rollout.meta["verified_reward"] = verified[j]
            rollout.meta["learned_rewards"] = {name: values[j] for name, values in scores.items()}
            if judge_answers is not None:
                rollout.meta["judge_answer"] = judge_answers[j]

    async def _rewards(self, index: int, problem, completions: list[str],
                       completion_ids: list[list[int]]) -> list[float]:
        def score() -> list[float]:
            if hasattr(self.task, "rewards"):  # a whole group at once (TRL-style functions)
                return [float(r) for r in self.task.rewards(problem, completions, completion_ids)]
            return [float(self.task.reward(problem, c)) for c in completions]

        try:
            return await call_with_timeout(score, timeout=self.limits.reward_timeout_s)
        except asyncio.TimeoutError as e:
            raise GroupRejected("reward_timeout", f"problem {index}: the reward function took "
                                                  f"more than {self.limits.reward_timeout_s} s",
                                e) from None
        except Exception as e:
            raise GroupRejected("reward_error", f"problem {index}: the reward function raised "
                                                f"{type(e).__name__}: {e}", e) from e

    @property
    def engine_generation(self) -> int:
        """Counts engine replacements: callers pass it back to `replace_engine`."""
        return self._engine_generation

    async def replace_engine(self, generation: int, cause: BaseException) -> None:
        """The engine of `generation` died (seen by the pipeline, e.g. during a weight push)."""
        await self._recover(generation, cause)

    async def _recover(self, generation: int, cause: BaseException) -> None:
        """Replace a dead or stuck engine (once, whichever group notices first)."""
        async with self._recovery:
            if generation != self._engine_generation:
                return  # another group already replaced it
            if self.restart_engine is None:
                raise RunStopped(f"the vLLM engine died ({type(cause).__name__}) and this run "
                                 "cannot restart it") from cause
            now = time.monotonic()
            recent = [t for t in self.restarts if now - t < self.limits.restart_window_s]
            if len(recent) >= self.limits.max_restarts:
                raise RunStopped(f"the vLLM engine died {len(recent) + 1} times within "
                                 f"{self.limits.restart_window_s:g} s (actor.max_restarts="
                                 f"{self.limits.max_restarts}); last: "
                                 f"{type(cause).__name__}") from cause
            self.on_error("engine_restart", cause)
            self._noticed_death = now
            self.engine = await self.restart_engine()
            self.restarts.append(time.monotonic())
            self._engine_generation += 1

    # -- outcomes ---------------------------------------------------------------------------------
    def _rejected(self, index: int, error: GroupRejected) -> None:
        self.rejected[error.kind] += 1
        self.ledger.mark(index, "rejected")
        self.on_error(error.kind, error)
        done = self.accepted + sum(self.rejected.values())
        share = sum(self.rejected.values()) / done
        if done >= MIN_GROUPS and share > self.limits.max_rejected_frac:
            worst = self.rejected.most_common(1)[0][0]
            raise RunStopped(f"{share:.0%} of {done} groups were rejected (actor.max_rejected_frac="
                             f"{self.limits.max_rejected_frac:g}), most for {worst}: {error}")

    def metrics(self) -> dict[str, float]:
        done = self.accepted + sum(self.rejected.values())
        return {**{f"rollouts/rejected_{kind}": float(self.rejected[kind])
                   for kind in REJECTION_KINDS},
                "rollouts/rejected_frac": sum(self.rejected.values()) / done if done else 0.0,
                **({"rollouts/dropped_no_signal": float(self.no_signal)}
                   if self.dynamic.enabled else {}),
                **({"rollouts/template_mismatch": float(self.template_mismatches)}
                   if self.env is not None else {}),
                **(self.learned.metrics() if self.learned is not None else {}),
                "engine/restarts": float(len(self.restarts)),
                **({"engine/recovery_s": self.recoveries[-1]} if self.recoveries else {})}

    # -- batches ----------------------------------------------------------------------------------
    async def generate_batch(self, num_groups: int) -> list[Group]:
        """Sync mode: the next `num_groups` problems, generated together (minus the rejected).
        With dynamic sampling the groups without signal are dropped and more problems drawn, up
        to the cap (`DynamicSamplingConfig`)."""
        groups: list[Group] = []
        drawn, cap, said = 0, math.ceil(self.dynamic.max_draws * num_groups), False
        while len(groups) < num_groups:
            if drawn >= cap:
                if self.dynamic.at_cap == "train_fewer" and groups:
                    break
                if not said:  # at_cap=wait, or nothing with signal yet: drawing on
                    said = True
                    self.on_error("no_signal_cap", RuntimeError(
                        f"{drawn} groups drawn for a step of {num_groups}, {len(groups)} with "
                        f"signal (actor.dynamic_sampling.max_draws="
                        f"{self.dynamic.max_draws:g}); drawing on"))
            wanted = num_groups - len(groups)
            if drawn < cap:  # a round never draws past the cap
                wanted = min(wanted, cap - drawn)
            groups += await self._draw(wanted)
            drawn += wanted
            if not self.dynamic.enabled:
                break
        return groups

    async def _draw(self, num_groups: int) -> list[Group]:
        """The next `num_groups` problems generated together: the accepted groups with signal."""
        indices = [self.ledger.take() for _ in range(num_groups)]
        outcomes = await asyncio.gather(*[self.generate_group(i) for i in indices],
                                        return_exceptions=True)
        groups = []
        for index, outcome in zip(indices, outcomes):
            if isinstance(outcome, GroupRejected):
                self._rejected(index, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            elif self._keeps(index, outcome):
                groups.append(outcome)
        return groups

    def _keeps(self, index: int, group: Group) -> bool:
        """Accepted; False when dynamic sampling drops it (its problem marked done)."""
        self.accepted += 1
        if self.dynamic.enabled and not has_signal(group):
            self.no_signal += 1
            self.ledger.mark(index, "no_signal")
            return False
        return True

    async def run(self, stream: RolloutStream, budget: asyncio.Semaphore) -> None:
        """Async mode: generate forever; each group holds one `budget` slot until trained on (a
        rejected group gives its slot back at once). Raises what stops the run."""
        tasks: set[asyncio.Task] = set()
        failed: asyncio.Future = asyncio.get_running_loop().create_future()

        def settle(task: asyncio.Task) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None and not failed.done():
                failed.set_exception(task.exception())

        acquire: asyncio.Future | None = None
        try:
            while True:
                acquire = asyncio.ensure_future(budget.acquire())
                await asyncio.wait({acquire, failed}, return_when=asyncio.FIRST_COMPLETED)
                if failed.done():
                    failed.result()  # raises
                index = self.ledger.take()
                task = asyncio.create_task(self._generate_into(index, stream, budget))
                tasks.add(task)
                task.add_done_callback(settle)
        finally:
            # Cancel and await everything this loop started: a task left pending here is destroyed
            # pending at exit ("Task was destroyed but it is pending!").
            leftovers = [*tasks, *([acquire] if acquire is not None else [])]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

    async def _generate_into(self, index: int, stream: RolloutStream,
                             budget: asyncio.Semaphore) -> None:
        try:
            group = await self.generate_group(index)
        except GroupRejected as e:
            budget.release()
            self._rejected(index, e)
            return
        if self._keeps(index, group):
            await stream.put(group)
        else:
            budget.release()
            stream.drop()

    # -- engine busy time -------------------------------------------------------------------------
    def _enter(self) -> None:
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._busy_since is not None:
            self.engine_busy_seconds += time.perf_counter() - self._busy_since
            self._busy_since = None

    def busy_seconds_now(self) -> float:
        extra = time.perf_counter() - self._busy_since if self._busy_since is not None else 0.0
        return self.engine_busy_seconds + extra
