"""The doctor's options (`parityrl doctor --help` shows these descriptions): what to measure,
how to sample, which checks to add, where to write. Combinations the doctor cannot run are refused
here, in the words the command line prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from parityrl.core.errors import UserError
from parityrl.core.sampling import SamplingConfig
from parityrl.doctor.rungs import withhold_problem
from parityrl.engine.settings import Dtype
from parityrl.models.builtin import PREFIX
from parityrl.models.load import check_model_folder
from parityrl.tasks.prompt_file import read_prompts

WeightTransport = Literal["shm_file", "gloo"]


class DoctorConfig(BaseModel):
    """The options of `parityrl doctor`, one run's: `parityrl.doctor.run(config)` measures what
    they ask for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="Hugging Face model folder, or builtin:<name> "
                              "(tiny, arithmetic-warm, smollm2-135m-instruct, ...).")
    dtype: Dtype = Field("float32", description="float32, bfloat16 or float16 (both sides).")
    temperature: float = Field(0.7, description="Sampling temperature of every request, both "
                                                "sides; below 1e-5 is greedy.")
    top_p: float = Field(1.0, description="Nucleus sampling: the probability mass kept, in "
                                          "(0, 1]; 1 disables it.")
    top_k: int = Field(0, description="Keep the k most likely tokens; 0 disables top-k.")
    prompts: Path | None = Field(
        None, description='Text file (one prompt a line) or JSONL rows with "messages" or '
                          '"prompt" (+ "system"). Default: built-in.')
    chat_template: bool | None = Field(
        None, description="Render prompts with the tokenizer's chat template. Default: when it "
                          "has one.")
    num_samples: int = Field(4, ge=1, description="Samples per prompt.")
    max_tokens: int = Field(32, ge=1, description="Completion length cap, in tokens.")
    seed: int = Field(0, description="Seeds the engine's sampling, the weight-sync rung's "
                                     "perturbation and the LoRA adapter.")
    tol: float | None = Field(
        None, description="An absolute bound on the last rung's max |Δ| instead of the float64 "
                          "rule (the engine as close to exact arithmetic as the trainer).")
    quick: bool = Field(False, description="Only the last rung (the settings to use, weights "
                                           "pushed): one engine start.")
    withhold: tuple[str, ...] = Field(
        (), description="Leave a fix out to see what it is worth (repeatable): "
                        "processed-logprobs, explicit-runtime, weight-sync, fp32-lm-head, "
                        "prefix-cache-reset.")
    json_out: Path | None = Field(None, description="Write the results as JSON to this file.")
    report: Path | None = Field(None, description="Write a Markdown report and PNG plots into this "
                                                  "folder.")
    multi_turn: bool = Field(
        False, description="Also run two-turn episodes (a tool observation between the turns) "
                           "on the last rung's settings: per-turn parity and the chat-template "
                           "check; with --bitwise, three-turn episodes after the bitwise rung "
                           "too, every token equal. Needs a chat template.")
    bitwise: bool = Field(
        False, description="Add the bitwise rung: the trainer scores with the engine's own "
                           "kernels (parity.mode=bitwise; float32, CPU engine); it passes only "
                           "if every token's logprob is equal.")
    sampler_draws: int = Field(
        0, ge=0, description="Also test the sampler on the last rung's engine: this many "
                             "one-token draws a prompt, G-tested against the engine's reported "
                             "probabilities and the trainer's distribution (0 = off; 2000 is a "
                             "good start).")
    lora: int | None = Field(
        None, ge=1, description="Measure with a random non-zero LoRA adapter of this rank on "
                                "every linear of the decoder, pushed into the engine as a "
                                "training run pushes it; the weight-sync rung moves the adapter.")
    compare_dtypes: bool = Field(
        False, description="Instead of the ladder: its last rung in float32, bfloat16 and "
                           "float16 (both sides, one engine each), as a table of each side's "
                           "error against float64, the mismatch, KL and the share of ratios "
                           "outside [0.8, 1.25].")
    weight_transport: WeightTransport = Field(
        "shm_file", description="How the rungs push weights: shm_file (shared memory) or gloo "
                                "(vLLM's weight-transfer API, as engine.weight_transport=gloo "
                                "in a run).")

    reward_model: str | None = Field(
        None, description="Instead of the ladder: score texts with this sequence-classification "
                          "reward model on a vLLM pooling engine and in transformers (float32 "
                          "and float64), and say whether they agree (doctor/reward.py).")
    reward_texts: Path | None = Field(
        None, description='--reward-model: JSONL rows {"prompt": text or messages, '
                          '"completions": [...]}, one group each. Default: built-in groups.')
    reward_activation: Literal["none", "sigmoid"] = Field(
        "none", description="--reward-model: the activation both sides apply to the score "
                            "(rewards.models[].activation).")
    reward_engine_activation: Literal["same", "none", "sigmoid", "vllm-default"] = Field(
        "same", description="--reward-model: the engine side's activation, to reproduce a "
                            "set-up that differs ('vllm-default': left to vLLM, which applies "
                            "a sigmoid to a one-label score).")

    @field_validator("dtype", mode="before")
    @classmethod
    def _known_dtype(cls, v):
        if v not in get_args(Dtype):
            raise ValueError(f"unknown dtype {v!r}; choose one of {', '.join(get_args(Dtype))}")
        return v

    @field_validator("tol")
    @classmethod
    def _tol_non_negative(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError(f"--tol must be >= 0, got {v}")
        return v

    @field_validator("withhold")
    @classmethod
    def _withholdable(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        problem = withhold_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts_readable(cls, v: Path | None) -> Path | None:
        # Read once here too (prompt files are small): a bad file fails before anything starts.
        if v is not None:
            try:
                read_prompts(v)
            except UserError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("weight_transport", mode="before")
    @classmethod
    def _known_transport(cls, v):
        if v not in get_args(WeightTransport):
            raise ValueError(f"unknown --weight-transport {v!r}; choose shm_file or gloo")
        return v

    @model_validator(mode="after")
    def _compare_dtypes_runs_alone(self) -> "DoctorConfig":
        if self.compare_dtypes:
            clash = [name for name, on in (
                ("--bitwise", self.bitwise), ("--multi-turn", self.multi_turn),
                ("--lora", self.lora), ("--sampler-draws", self.sampler_draws),
                ("--dtype", self.dtype != "float32")) if on]
            if clash:
                raise ValueError(f"--compare-dtypes runs the last rung in each dtype; leave out "
                                 f"{', '.join(clash)}")
        return self

    @model_validator(mode="after")
    def _sampling_is_reproducible(self) -> "DoctorConfig":
        try:
            _ = self.sampling
        except ValidationError as e:
            raise ValueError(_message(e)) from None
        return self

    @model_validator(mode="after")
    def _bitwise_in_float32(self) -> "DoctorConfig":
        if self.bitwise and self.dtype != "float32":
            raise ValueError(f"--bitwise is audited in float32 only, not {self.dtype}")
        return self

    @model_validator(mode="after")
    def _lora_over_shm_file(self) -> "DoctorConfig":
        if self.lora and self.weight_transport != "shm_file":
            raise ValueError("--lora pushes adapters as PEFT folders on this host: use "
                             "--weight-transport shm_file")
        return self

    @model_validator(mode="after")
    def _one_subject(self) -> "DoctorConfig":
        if (self.model is None) == (self.reward_model is None):
            raise ValueError("give --model (the policy's logprob ladder) or --reward-model (a "
                             "reward model's scores), one of the two")
        if self.reward_model is not None:
            clash = [name for name, on in (
                ("--bitwise", self.bitwise), ("--multi-turn", self.multi_turn),
                ("--lora", self.lora), ("--sampler-draws", self.sampler_draws),
                ("--compare-dtypes", self.compare_dtypes), ("--prompts", self.prompts)) if on]
            if clash:
                raise ValueError(f"--reward-model scores texts; leave out {', '.join(clash)} "
                                 "(--reward-texts gives the texts)")
        return self

    @model_validator(mode="after")
    def _model_folder_exists(self) -> "DoctorConfig":
        # Last, as the command line always checked it, and before anything heavy is imported; a
        # built-in model is built (once) when the doctor runs.
        if self.model is not None and not self.model.startswith(PREFIX):
            try:
                check_model_folder(self.model)
            except UserError as e:
                raise ValueError(str(e)) from None
        return self

    @property
    def sampling(self) -> SamplingConfig:
        """The sampling of every request (both sides apply it)."""
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens)


def _message(error: ValidationError) -> str:
    """The first error in one line: a check's own words, else where it is and what is wrong."""
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in first["loc"])
    return message if first["type"] == "value_error" or not where else f"{where}: {message}"


def parse_config(options: dict) -> DoctorConfig:
    """A DoctorConfig from options by field name; what it refuses is a one-line UserError."""
    try:
        return DoctorConfig(**options)
    except ValidationError as e:
        raise UserError(_message(e)) from None
