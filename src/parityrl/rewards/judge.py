"""An LLM judge: its own engine and model (never the policy's changing weights), a prompt
template, greedy decoding, and a parser that reads a score or a verdict from its answer.

    judge = await Judge.start(config, folder, tokenizer)
    answers = await judge.answers(problem, completions)   # parse_answer(config.parser, answer)
"""

from __future__ import annotations

import asyncio
import re

from parityrl.core.sampling import SamplingConfig
from parityrl.engine.engine import RolloutEngine
from parityrl.engine.process import core_pids
from parityrl.engine.settings import EngineSettings
from parityrl.rewards.config import JudgeConfig, JudgeParser
from parityrl.rewards.reward_model import default_threads_bind
from parityrl.tasks.base import Problem
from parityrl.tasks.prompts import encode_prompt, has_chat_template


def parse_answer(parser: JudgeParser, answer: str) -> float | None:
    """The judge's score in `answer`, or None when the parser cannot read one."""
    if parser.type == "score":
        found = re.search(parser.pattern, answer)
        if found is None:
            return None
        try:
            return float(found.group(1)) / parser.scale
        except (IndexError, ValueError):
            return None
    words = re.findall(r"[a-z]+", answer.lower())
    return next((parser.verdicts[w] for w in words if w in parser.verdicts), None)


def fill_template(template: str, problem: Problem, completion: str) -> str:
    """The template with its slots filled (plain replacement: braces elsewhere stay as written)."""
    return (template.replace("{prompt}", problem.prompt).replace("{answer}", problem.answer)
            .replace("{completion}", completion))


class Judge:
    def __init__(self, config: JudgeConfig, tokenizer, engine: RolloutEngine) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.engine = engine
        self.chat = config.chat_template and has_chat_template(tokenizer)
        self.sampling = SamplingConfig(temperature=0.0, max_tokens=config.max_tokens)
        self.starts = 0  # engine restarts so far (LearnedRewards tells a new engine by it)

    @staticmethod
    def settings(config: JudgeConfig, folder) -> EngineSettings:
        e = config.engine
        return EngineSettings(model=str(folder), dtype=config.dtype, max_model_len=e.max_model_len,
                              kv_cache_gib=e.kv_cache_gib, max_num_seqs=e.max_num_seqs,
                              max_num_batched_tokens=max(4096, e.max_model_len),
                              cpu_threads_bind=e.cpu_threads_bind or default_threads_bind())

    @classmethod
    async def start(cls, config: JudgeConfig, folder, tokenizer) -> "Judge":
        engine = await RolloutEngine.start(cls.settings(config, folder), role="judge")
        return cls(config, tokenizer, engine)

    async def answers(self, problem: Problem, completions: list[str]) -> list[str]:
        """The judge's greedy answer to each completion, all in flight at once."""
        prompts = [encode_prompt(self.tokenizer, fill_template(self.config.template, problem, c),
                                 chat_template=self.chat) for c in completions]
        groups = await asyncio.gather(*[self.engine.generate(ids, self.sampling, n=1, seed=0)
                                        for ids in prompts])
        return [self.tokenizer.decode(g[0].completion_ids, skip_special_tokens=True)
                for g in groups]

    @property
    def dead(self) -> bool:
        return self.engine.llm is None or self.engine.llm.errored

    async def restart(self) -> None:
        folder = self.engine.settings.model
        await self.engine.close()
        self.engine = await RolloutEngine.start(self.settings(self.config, folder),
                                                role="judge")
        self.starts += 1

    def resolved_settings(self) -> dict:
        return {"role": "judge", "weight": self.config.weight, "chat_template": self.chat,
                "sampling": self.sampling.model_dump(), **self.engine.resolved_settings(),
                "cpu_threads_bind": self.engine.settings.cpu_threads_bind,
                "engine_core_pids": core_pids(self.engine.llm)}

    async def close(self) -> None:
        await self.engine.close()
