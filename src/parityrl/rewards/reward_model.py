"""A sequence-classification reward model: served by a vLLM pooling engine, or by transformers.

    model = await RewardModel.start(config, folder, tokenizer)
    scores = await model.score_ids(model.sequences(problem, completions))  # one per completion
    await model.close()

`ReferenceRewardModel` is transformers' `AutoModelForSequenceClassification` in this process:
the `transformers` backend, and the reference the doctor and the run's periodic check compare
the engine against (float32 and float64). Both read the score of the first label at the last
token and apply the configured activation, or none.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import torch

from parityrl.core.errors import UserError
from parityrl.core.hf import BUILDING_MODEL
from parityrl.engine.pooling import PoolingEngine
from parityrl.engine.settings import EngineSettings
from parityrl.rewards.config import RewardModelConfig, ServingEngine
from parityrl.rewards.texts import encode_texts, reward_texts
from parityrl.tasks.base import Problem

REFERENCE_BATCH = 16  # sequences per transformers forward (padded on the right)


def check_reward_model_folder(folder: Path) -> dict:
    """The folder's config.json, or a one-line error naming what it is instead."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"reward model {folder}: no config.json there (not a model folder)")
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"reward model {folder}: not a sequence-classification model (its "
                        f"architectures: {', '.join(architectures) or 'none'}); a reward model "
                        "is a *ForSequenceClassification folder with one label")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != 1:
        raise UserError(f"reward model {folder}: {labels} labels; a reward model has one "
                        "(num_labels=1), whose score is the reward")
    return config


def default_threads_bind() -> str:
    """The last core this process may use: the policy engine's threads start from the first."""
    return str(max(os.sched_getaffinity(0)))


def pooling_settings(folder: Path, dtype: str, engine: ServingEngine) -> EngineSettings:
    return EngineSettings(model=str(folder), dtype=dtype, runner="pooling",
                          max_model_len=engine.max_model_len, kv_cache_gib=engine.kv_cache_gib,
                          max_num_seqs=engine.max_num_seqs,
                          max_num_batched_tokens=max(4096, engine.max_model_len),
                          cpu_threads_bind=engine.cpu_threads_bind or default_threads_bind())


class ReferenceRewardModel:
    """transformers in this process: `score` takes token ids, as the engine does."""

    def __init__(self, folder: Path, dtype: str = "float32") -> None:
        from transformers import AutoModelForSequenceClassification

        check_reward_model_folder(folder)
        self.dtype = getattr(torch, dtype)
        with BUILDING_MODEL:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=self.dtype).eval()
        self.head = getattr(self.model, "score", None)  # transformers' decoder classifiers
        if self.head is None:
            raise UserError(f"reward model {folder}: {type(self.model).__name__} has no `score` "
                            "head (the decoder classifiers' layout this reference reads)")
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            raise UserError(f"reward model {folder}: no pad_token_id in its config (transformers "
                            "finds the last token of a padded row by it)")

    @torch.no_grad()
    def score(self, sequences: list[list[int]], activation: bool) -> list[float]:
        out: list[float] = []
        for start in range(0, len(sequences), REFERENCE_BATCH):
            rows = sequences[start:start + REFERENCE_BATCH]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            # The last real token of each row, explicitly (a pad id inside a text would fool
            # transformers' own search for the first pad).
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = hidden[torch.arange(len(rows)), mask.sum(1) - 1]
            logits = self.head(last)[:, 0].double()
            out += (torch.sigmoid(logits) if activation else logits).tolist()
        return out


class RewardModel:
    """One configured reward model, on its backend; restarted (by `LearnedRewards`) if its
    engine dies."""

    def __init__(self, config: RewardModelConfig, folder: Path, tokenizer) -> None:
        self.config = config
        self.folder = folder
        self.tokenizer = tokenizer
        self.engine: PoolingEngine | None = None
        self.reference: ReferenceRewardModel | None = None  # transformers: the backend itself
        self.activation = config.activation == "sigmoid"
        self.starts = 0  # engine restarts so far (LearnedRewards tells a new engine by it)

    @classmethod
    async def start(cls, config: RewardModelConfig, folder: Path, tokenizer) -> "RewardModel":
        """`tokenizer`: the folder's own (what its texts are tokenized with)."""
        check_reward_model_folder(folder)
        model = cls(config, folder, tokenizer)
        if config.backend == "vllm":
            model.engine = await PoolingEngine.start(
                pooling_settings(folder, config.dtype, config.engine))
        else:
            model.reference = ReferenceRewardModel(folder, config.dtype)
        return model

    def sequences(self, problem: Problem, completions: list[str]) -> list[list[int]]:
        return encode_texts(self.tokenizer, reward_texts(self.tokenizer, problem, completions))

    async def score_ids(self, sequences: list[list[int]]) -> list[float]:
        if self.engine is not None:
            return await self.engine.score(sequences, activation=self.activation)
        return await asyncio.to_thread(self.reference.score, sequences, self.activation)

    @property
    def dead(self) -> bool:
        return self.engine is not None and self.engine.dead

    async def restart(self) -> None:
        await self.close()
        self.engine = await PoolingEngine.start(
            pooling_settings(self.folder, self.config.dtype, self.config.engine))
        self.starts += 1

    def resolved_settings(self) -> dict:
        where = (self.engine.resolved_settings() if self.engine is not None
                 else {"backend": "transformers", "dtype": self.config.dtype})
        return {"path": str(self.folder), "activation": self.config.activation,
                "weight": self.config.weight, **where}

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
