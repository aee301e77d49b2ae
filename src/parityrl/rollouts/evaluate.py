"""Held-out evaluation: greedy accuracy on the task's eval problems, on the engine (training runs)
or on the trainer's model (the warm start, the TRL side-by-side, where no engine runs); and, on
the engine, pass@k and mean@n from n sampled completions per problem.

Like the greedy accuracy, the sampled evaluation asks the engine directly: its completions never
reach the actor, the rollout stream, the ledger or the parity probe."""

from __future__ import annotations

import asyncio

from parityrl.rollouts.episode import EpisodeLimits, engine_turns, run_episode
from parityrl.core.sampling import SamplingConfig
from parityrl.tasks.environment import Environment, EnvReply
from parityrl.tasks.base import Problem, Task
from parityrl.tasks.prompts import encode_problem


async def greedy_accuracy(engine, task: Task, tokenizer, problems: list[Problem],
                          max_tokens: int, env: Environment | None = None,
                          limits: EpisodeLimits | None = None) -> float:
    """Fraction of `problems` whose greedy completion (with `env`: greedy episode) gets reward 1."""
    eos = tokenizer.eos_token_id
    sampling = SamplingConfig(temperature=0.0, max_tokens=max_tokens,
                              stop_token_ids=(eos,) if eos is not None else ())

    generate = engine_turns(engine)

    async def solve(problem: Problem) -> float:
        if env is not None:
            return await _episode_solved(generate, env, problem, tokenizer, sampling, limits, 0)
        rollout = await generate(encode_problem(tokenizer, problem), sampling, None)
        return _solved(task, tokenizer, problem, rollout)

    scores = await asyncio.gather(*[solve(p) for p in problems])
    return sum(scores) / max(len(scores), 1)


def _solved(task: Task, tokenizer, problem: Problem, rollout) -> float:
    """1.0 when a single-turn completion gets reward 1, else 0.0."""
    text = tokenizer.decode(rollout.completion_ids, skip_special_tokens=True)
    return float(task.reward(problem, text) >= 1.0)


async def _episode_solved(generate, env: Environment, problem: Problem, tokenizer,
                          sampling: SamplingConfig, limits: EpisodeLimits | None,
                          seed: int) -> float:
    """1.0 when an episode of `problem` with `env` ends with reward 1, else 0.0."""
    async def respond(messages, last_turn: bool) -> EnvReply:
        return await asyncio.to_thread(env.respond, problem, messages, last_turn)

    episode = await run_episode(generate, respond, tokenizer, env.start(problem), sampling,
                                limits, seed=seed)
    return float(episode.reward >= 1.0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of a problem with `c` correct among `n` samples (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k of the n drawn without replacement hold a correct
    one; computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), without the large binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


async def sampled_pass_at_k(engine, task: Task, tokenizer, problems: list[Problem],
                            sampling: SamplingConfig, ks: list[int], n: int, seed: int = 0,
                            env: Environment | None = None,
                            limits: EpisodeLimits | None = None) -> dict[str, float]:
    """`eval/pass@{k}` for each k (the mean over `problems` of `pass_at_k`) and `eval/mean@{n}`
    (the fraction of all samples with reward 1), from `n` completions per problem sampled with
    `sampling` (with `env`: n episodes). Problem i's samples get seeds seed + i*n … seed + i*n +
    n-1 (one request of n: vLLM gives the j-th seed + j), the same at every evaluation."""
    generate = engine_turns(engine)

    async def solve(i: int, problem: Problem) -> list[float]:
        first = seed + i * n
        if env is not None:
            return list(await asyncio.gather(*[
                _episode_solved(generate, env, problem, tokenizer, sampling, limits, first + j)
                for j in range(n)]))
        rollouts = await engine.generate(encode_problem(tokenizer, problem), sampling, n=n,
                                         seed=first)
        return [_solved(task, tokenizer, problem, r) for r in rollouts]

    scores = await asyncio.gather(*[solve(i, p) for i, p in enumerate(problems)])
    count = max(len(scores), 1)
    metrics = {f"eval/pass@{k}": sum(pass_at_k(n, int(sum(s)), k) for s in scores) / count
               for k in sorted(set(ks))}
    metrics[f"eval/mean@{n}"] = sum(map(sum, scores)) / max(n * len(scores), 1)
    return metrics


def model_greedy_accuracy(model, tokenizer, task: Task, problems: list[Problem],
                          max_tokens: int) -> float:
    """Fraction of `problems` whose greedy completion by `model` (transformers' generate, left
    padding, one batch) gets reward 1."""
    import torch

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True,
                          add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(task.reward(p, t) >= 1.0 for p, t in zip(problems, texts)) / max(len(problems), 1)
