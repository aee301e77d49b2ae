"""Prompt text or chat messages → the token ids the engine is given (and the trainer rescores).

With `chat_template` on, a plain prompt becomes one user message and messages are rendered with the
tokenizer's own template (`add_generation_prompt=True`), then tokenized without adding special
tokens again (the template already holds them), the way vLLM's chat endpoint does. Without it the
text is tokenized as is: what a base model or the built-in character models expect.
"""

from __future__ import annotations

from parityrl.core.errors import UserError

Messages = list[dict[str, str]]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def as_messages(prompt: str | Messages, system: str | None = None) -> Messages:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_text(tokenizer, prompt: str | Messages, chat_template: bool,
                add_generation_prompt: bool = True) -> str:
    """The exact text the model sees (without the generation prompt: a finished conversation)."""
    if not chat_template:
        if not isinstance(prompt, str):
            raise UserError("chat messages need chat_template on (the tokenizer renders them)")
        return prompt
    if not has_chat_template(tokenizer):
        raise UserError("chat_template is on, but the model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode_prompt(tokenizer, prompt: str | Messages, chat_template: bool,
                  add_generation_prompt: bool = True) -> list[int]:
    return tokenizer(render_text(tokenizer, prompt, chat_template, add_generation_prompt),
                     add_special_tokens=False)["input_ids"]


def encode_problem(tokenizer, problem) -> list[int]:
    """The token ids of a task's problem: its chat messages rendered, or its plain prompt."""
    if problem.messages is not None:
        return encode_prompt(tokenizer, list(problem.messages), chat_template=True)
    return encode_prompt(tokenizer, problem.prompt, chat_template=False)
