"""Held-out evaluation: greedy accuracy on the task's eval problems, on the engine (training runs)
or on the trainer's model (the warm start, the TRL side-by-side, where no engine runs)."""

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
            async def respond(messages, last_turn: bool) -> EnvReply:
                return await asyncio.to_thread(env.respond, problem, messages, last_turn)

            episode = await run_episode(generate, respond, tokenizer, env.start(problem),
                                        sampling, limits, seed=0)
            return float(episode.reward >= 1.0)
        rollout = await generate(encode_problem(tokenizer, problem), sampling, None)
        text = tokenizer.decode(rollout.completion_ids, skip_special_tokens=True)
        return float(task.reward(problem, text) >= 1.0)

    scores = await asyncio.gather(*[solve(p) for p in problems])
    return sum(scores) / max(len(scores), 1)


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
