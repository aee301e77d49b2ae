"""The sampling contract between the engine and the trainer.

vLLM V1's sampler (vllm/v1/sample/sampler.py, 0.32) turns logits into the distribution it samples
from in this order: float32 → allowed-token whitelist → bad words → min-tokens / logit bias →
repetition/frequency/presence penalties → temperature (random sampling only) → min-p → top-k/top-p
masking. With `logprobs_mode="processed_logprobs"` the reported logprob is log_softmax of what is
left. The trainer reproduces temperature, top-k and top-p exactly; every other step is refused here,
in one place, so neither side can silently apply something the other does not.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from parityrl.core.errors import UserError

# vLLM treats temperatures below this as greedy (vllm/v1/sample/sampler.py: _SAMPLING_EPS).
GREEDY_EPS = 1e-5


class SamplingConfig(BaseModel):
    """Per-request sampling parameters that both the engine and the trainer apply."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, description="Softmax temperature; < 1e-5 means greedy.")
    top_p: float = Field(1.0, description="Nucleus mass kept, in (0, 1]; 1 disables it.")
    top_k: int = Field(0, description="Keep the k most likely tokens (ties kept); 0 disables it.")
    max_tokens: int = Field(64, description="Completion length cap.", ge=1)
    stop_token_ids: tuple[int, ...] = Field((), description="Extra tokens that end a completion.")

    @field_validator("temperature")
    @classmethod
    def _temperature_non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"temperature must be >= 0, got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p_range(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {v}")
        return v

    @model_validator(mode="after")
    def _greedy_has_no_filters(self) -> "SamplingConfig":
        # In vLLM a greedy request's processed logprobs depend on the batch it lands in: an
        # all-greedy batch skips top-k/top-p, a mixed batch applies them at temperature 1.
        # That is not reproducible by the trainer, so we refuse it.
        if self.is_greedy and (self.top_k or self.top_p < 1.0):
            raise ValueError("greedy sampling (temperature 0) cannot be combined with top_k/top_p")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def to_vllm(self, *, seed: int | None = None, n: int = 1):
        """The vLLM `SamplingParams` for this config, every processing step spelled out."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k > 0 else 0,
            min_p=0.0,
            repetition_penalty=1.0,
            frequency_penalty=0.0,
            presence_penalty=0.0,
            min_tokens=0,
            logit_bias=None,
            allowed_token_ids=None,
            bad_words=None,
            max_tokens=self.max_tokens,
            stop_token_ids=list(self.stop_token_ids),
            logprobs=0,  # 0 = only the sampled token's logprob
            seed=seed,
            detokenize=False,
            skip_special_tokens=False,
            # One output per request when it finishes: per-step partial outputs cost the frontend
            # process CPU time the engine needs (measured by `parityrl bench`, stage rollout).
            output_kind=RequestOutputKind.FINAL_ONLY,
        )


def make_sampling(**kwargs) -> SamplingConfig:
    """Build a SamplingConfig, turning validation errors into a one-line UserError."""
    from pydantic import ValidationError

    try:
        return SamplingConfig(**kwargs)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(str(first["msg"]).removeprefix("Value error, ")) from None


def check_reproducible(params) -> None:
    """Refuse vLLM SamplingParams whose processing the trainer does not reproduce.

    Used when a caller hands us raw vLLM params instead of a SamplingConfig.
    """
    unsupported = {
        "min_p": params.min_p != 0.0,
        "repetition_penalty": params.repetition_penalty != 1.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "presence_penalty": params.presence_penalty != 0.0,
        "min_tokens": params.min_tokens != 0,
        "logit_bias": bool(params.logit_bias),
        "allowed_token_ids": bool(params.allowed_token_ids),
        "bad_words": bool(params.bad_words),
    }
    bad = [name for name, used in unsupported.items() if used]
    if bad:
        raise UserError(
            f"sampling parameter(s) {', '.join(bad)} are not reproduced by the trainer; "
            "remove them or implement them in parityrl/trainer/logprobs.py"
        )


def from_vllm(params) -> SamplingConfig:
    """The SamplingConfig equivalent to vLLM SamplingParams, refusing what we cannot reproduce."""
    check_reproducible(params)
    return make_sampling(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=max(params.top_k, 0),
        max_tokens=params.max_tokens or 1,
        stop_token_ids=tuple(params.stop_token_ids or ()),
    )
