"""What a reward model reads for a completion, as TRL's GRPOTrainer builds it.

A plain-text problem: prompt + completion. A conversation: the prompt's messages and the
completion as the assistant's message, rendered with the reward model's own chat template (no
generation prompt: a finished conversation). Either is tokenized without adding special tokens
(the template already holds them): the same ids go to the engine and to the reference, so a
tokenizer default cannot make them differ.
"""

from __future__ import annotations

from parityrl.core.errors import UserError
from parityrl.tasks.base import Problem
from parityrl.tasks.prompts import has_chat_template


def reward_texts(tokenizer, problem: Problem, completions: list[str]) -> list[str]:
    if problem.messages is None:
        return [problem.prompt + c for c in completions]
    if not has_chat_template(tokenizer):
        raise UserError("the task's prompts are conversations, but the reward model's tokenizer "
                        "has no chat template to render them with")
    return [tokenizer.apply_chat_template(
        [*problem.messages, {"role": "assistant", "content": c}], tokenize=False)
        for c in completions]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
