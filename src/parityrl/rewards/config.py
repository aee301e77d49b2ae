"""The run's `rewards:` section: learned rewards beside the task's verifiable one.

    rewards:
      task_weight: 0.0            # the verifier only measures (reward/verified_mean)
      models:
        - path: runs/rm           # a *ForSequenceClassification folder with one label
          activation: none        # the raw score (TRL); sigmoid = vLLM's own default
      judge: {model: ..., template: "...{completion}...", parser: {type: verdict}}

A group's reward is task_weight × the task's reward + Σ weight × each model's score
(+ the judge's weight × its score).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServingEngine(_Strict):
    """The resources of a learned reward's own vLLM engine (its numerics are the parity
    settings, as the policy engine's: float32 head, no prefix caching, eager)."""

    max_model_len: int = Field(512, ge=16, description="Tokens of one scored text (prompt + "
                                                       "completion, with its template) at most.")
    kv_cache_gib: float = Field(0.25, gt=0, description="KV cache space in GiB.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences scored concurrently.")
    cpu_threads_bind: str | None = Field(
        None, description="CPU cores of the engine's threads (VLLM_CPU_OMP_THREADS_BIND); None "
                          "= the last core this process may use, so that it does not share "
                          "the policy engine's first core (the value used is written to "
                          "reward_engines.json).")


class RewardModelConfig(_Strict):
    path: str = Field(description="A sequence-classification model folder with one label "
                                  "(its score is the reward), or builtin:<name>.")
    weight: float = Field(1.0, description="Its score's weight in the reward.")
    backend: Literal["vllm", "transformers"] = Field(
        "vllm", description="vllm: a pooling engine of its own (engine/pooling.py); "
                            "transformers: in this process, on the trainer's thread pool.")
    activation: Literal["none", "sigmoid"] = Field(
        "none", description="none: the raw score, as TRL rewards; sigmoid: vLLM's default for a "
                            "one-label classifier. Asked for explicitly on either backend.")
    dtype: Dtype = Field("float32", description="Weights and activations dtype.")
    engine: ServingEngine = Field(ServingEngine(), description="vllm backend: its engine.")
    check_every: int = Field(10, ge=0, description="vllm backend: every N scored groups, "
                             "score a sample of the group's texts in transformers (float32) too "
                             "and log the largest difference "
                             "(reward/model_<i>_vs_reference_max_abs); 0 = never.")
    check_samples: int = Field(8, ge=1, description="Texts per check.")


class JudgeParser(_Strict):
    type: Literal["score", "verdict"] = Field(
        description="score: the first number `pattern` captures; verdict: the first of "
                    "`verdicts`' words the answer contains (case-insensitive), as its value.")
    pattern: str = Field(r"(-?\d+(?:\.\d+)?)", description="score: a regular expression whose "
                                                            "first group is the score.")
    verdicts: dict[str, float] = Field({"yes": 1.0, "no": 0.0}, description="verdict: word → "
                                                                              "reward.")
    scale: float = Field(1.0, gt=0, description="score: the parsed number is divided by this "
                                                "(e.g. 10 for a 0–10 scale).")


class JudgeConfig(_Strict):
    model: str = Field(description="The judge's model folder (or builtin:<name>): its own "
                                   "engine, never the policy's changing weights.")
    weight: float = Field(1.0, description="Its score's weight in the reward.")
    template: str = Field(description="The judge's prompt: {completion} (required), {prompt} "
                                      "and {answer} are filled in.")
    chat_template: bool = Field(True, description="Render the prompt as a user message with the "
                                                  "judge's chat template (when it has one).")
    parser: JudgeParser | None = Field(None, description="How to read a score from the judge's "
                                                         "answer (required).")
    max_tokens: int = Field(16, ge=1, description="The judge's answer, greedy, at most.")
    on_unparseable: Literal["reject_group", "score"] = Field(
        "score", description="An answer the parser cannot read: reject the whole group, or "
                             "give it `unparseable_score`. Counted either way "
                             "(reward/judge_unparseable).")
    unparseable_score: float = Field(0.0, description="on_unparseable=score: its value.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds the judge may take for one group; "
                                                     "longer rejects the group (judge_timeout).")
    dtype: Dtype = Field("float32", description="Weights and activations dtype.")
    engine: ServingEngine = Field(ServingEngine(), description="Its engine.")

    @model_validator(mode="after")
    def _complete(self) -> "JudgeConfig":
        if self.parser is None:
            raise ValueError("rewards.judge needs a parser: {type: score} or {type: verdict}")
        if "{completion}" not in self.template:
            raise ValueError("rewards.judge.template has no {completion} slot for the answer "
                             "to judge")
        return self


class RewardsConfig(_Strict):
    task_weight: float = Field(1.0, description="Weight of the task's own (verifiable) reward; "
                               "0 = it only measures (reward/verified_mean) and the held-out "
                               "evaluation.")
    models: list[RewardModelConfig] = Field([], description="Reward models (TRL's "
                                            "reward_funcs entries that are model folders).")
    judge: JudgeConfig | None = Field(None, description="An LLM judge.")
    max_restarts: int = Field(3, ge=0, description="Reward engines restarted after dying, at "
                                                   "most this many times per run.")

    @property
    def learned(self) -> bool:
        return bool(self.models) or self.judge is not None
