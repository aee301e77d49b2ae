"""Learned rewards: a reward model or an LLM judge scores completions, beside the task's own
(verifiable) reward, which the run keeps measuring even when it does not reward.

    config.py        the run's `rewards:` section (typed, every knob explicit)
    texts.py         what a reward model reads for a completion (TRL's convention)
    reward_model.py  a sequence-classification folder: served by vLLM (engine/pooling.py) or by
                     transformers in-process (also the reference the doctor compares against)
    judge.py         a generative judge: its own engine, a prompt template, greedy, a parser
    learned.py       the run's learned rewards together: one group's scores, counts, checks
"""
