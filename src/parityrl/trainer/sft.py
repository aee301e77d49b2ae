"""Supervised warm start: teacher-forced answers, so that RL starts from a policy with some reward.

The loss is the negative logprob of the answer tokens (and EOS) computed by `token_logprobs` at
temperature 1, i.e. plain cross-entropy, through the same function the RL trainer uses.
"""

from __future__ import annotations

from typing import Callable

import torch

from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.tasks.base import Task
from parityrl.trainer.batch import collate
from parityrl.trainer.logprobs import token_logprobs

UNPROCESSED = SamplingConfig(temperature=1.0)


def supervised_warmup(model, tokenizer, task: Task, *, steps: int, batch_size: int, lr: float,
                      start_index: int = 10_000_000,
                      on_step: Callable[[int, float], None] | None = None,
                      done: Callable[[int], bool] | None = None, check_every: int = 100,
                      max_steps: int | None = None) -> list[float]:
    """Train `model` in place; returns the loss of each step.

    `steps` steps; with `done`, then on until `done(step)` (asked at `steps` and every
    `check_every` steps after) says so or `max_steps` is reached.
    Problems come from the task's training stream starting at `start_index`, far from where RL
    starts reading, so the warm start and RL see different problems.
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    losses = []
    last = steps if done is None else max(steps, max_steps or steps)
    for step in range(last):
        if step >= steps and (step - steps) % check_every == 0 and done(step):
            break
        examples = []
        for i in range(batch_size):
            problem = task.train_problem(start_index + step * batch_size + i)
            prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
            answer = tokenizer(problem.answer, add_special_tokens=False)["input_ids"] + [eos]
            examples.append(Rollout(prompt, answer, [0.0] * len(answer), [0] * len(answer), None))
        batch = collate(examples, tokenizer.pad_token_id)
        out = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask,
                             UNPROCESSED, with_entropy=False)
        loss = -out.logprobs[out.mask].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses
