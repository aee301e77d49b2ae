"""Reward functions in TRL's signature, for `task.type: hf_dataset` (docs/training.md).

    PYTHONPATH=examples parityrl train ... task.type=hf_dataset \
        task.path=examples/addition_prompts.jsonl 'task.reward_funcs=[trl_rewards:exact_answer]'

The same functions work unchanged in TRL's GRPOTrainer: fn(prompts, completions, **columns).
"""


def _text(completion) -> str:
    # a string for a plain-text prompt; [{"role": "assistant", "content": ...}] for a conversation
    return completion if isinstance(completion, str) else completion[0]["content"]


def exact_answer(prompts, completions, answer, **kwargs):
    """1 where the completion is the row's `answer` column exactly (spaces trimmed), else 0."""
    return [1.0 if _text(c).strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def digit_share(completions, **kwargs):
    """The share of digits in each completion: a dense signal even an untrained model earns."""
    return [sum(ch.isdigit() for ch in _text(c)) / max(len(_text(c)), 1) for c in completions]
