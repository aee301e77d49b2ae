"""What the doctor's ladder is made of: the fixes, the rungs they build, the ladder's settings and
one rung's measurement. Plain data (no torch): the verdict, the report and the options read it.

The rungs in order (ladder.py runs them, docs/doctor.md tells what each one found):

    vllm-defaults       what vLLM V1 gives a user who passes nothing (read back from vLLM)
    processed-logprobs  + logprobs of the distribution the sampler sampled from      (semantics)
    explicit-runtime    + prefix caching, chunked prefill, async scheduling off, eager, the
                          neutral generation config, a fixed seed                    (inference path)
    weight-sync         + the trainer perturbs its weights and pushes them in place   (weight sync)
    fp32-lm-head        + lm_head in float32 on both sides                           (numerics)
    routing-replay      (mixture-of-experts models) + the trainer routes each token to the
                          experts the engine chose (trainer.moe_routing=replay)  (routing)
    bitwise             (--bitwise) + the trainer runs the engine's own kernels, the engine
                          the settings they need: every token must be equal     (kernels)

A fix can be withheld (`LadderConfig.withhold`): its engine-side change and its weight push are
left out of its rung and every later one, while the trainer still does what the fix assumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parityrl.core.errors import UserError
from parityrl.core.sampling import SamplingConfig
from parityrl.engine.settings import BITWISE_KNOBS
from parityrl.tasks.prompts import Messages

DEFAULT_PROMPTS = [
    "12+7=", "What is 3*4? ", "The quick brown fox", "def add(a, b):\n",
    "Once upon a time", "x = [1, 2, 3]\n", "Q: 45-19=? A: ", "Hello, world! ",
]


@dataclass(frozen=True)
class Fix:
    name: str
    layer: str  # which layer of a mismatch it belongs to
    what: str  # in words, for the verdict
    engine: dict = field(default_factory=dict)  # EngineSettings fields it sets
    trainer_fp32_lm_head: bool = False
    pushes_weights: bool = False
    trainer_replays_routes: bool = False


FIXES = [
    Fix("processed-logprobs", "semantics", "logprobs of the processed distribution",
        {"logprobs_mode": "processed_logprobs"}),
    Fix("explicit-runtime", "inference path",
        "prefix caching, chunked prefill and async scheduling off, eager mode, the neutral "
        "generation config, a fixed seed",
        {"enable_prefix_caching": False, "enable_chunked_prefill": False,
         "async_scheduling": False, "enforce_eager": True, "generation_config": "vllm"}),
    Fix("weight-sync", "weight synchronisation",
        "the trainer's weights pushed in place (pause(keep), prefix-cache reset, digests)",
        pushes_weights=True),
    Fix("fp32-lm-head", "numerics", "lm_head in float32 on both sides",
        {"lm_head_dtype": "float32"}, trainer_fp32_lm_head=True),
]
ROUTING = Fix("routing-replay", "routing",
              "the trainer routes each token to the experts the engine chose "
              "(trainer.moe_routing=replay)", trainer_replays_routes=True)
BITWISE = Fix("bitwise", "kernels",
              "the trainer runs the engine's own kernels (parity.mode=bitwise)",
              dict(BITWISE_KNOBS), trainer_fp32_lm_head=True, pushes_weights=True)
FIX_NAMES = tuple(f.name for f in FIXES)
# Besides whole fixes, one part of the weight-sync fix can be withheld on its own.
WITHHOLDABLE = FIX_NAMES + (ROUTING.name, "prefix-cache-reset")
BASELINE = "vllm-defaults"


def withhold_problem(names) -> str | None:
    """Why these fixes cannot be withheld (names none of the ladder has); None when they can."""
    unknown = set(names) - set(WITHHOLDABLE)
    if not unknown:
        return None
    return f"cannot withhold {', '.join(sorted(unknown))}; choose from {', '.join(WITHHOLDABLE)}"


@dataclass(frozen=True)
class Rung:
    name: str
    layer: str
    fixes: tuple[Fix, ...]  # applied (cumulative), withheld ones removed
    withheld: tuple[str, ...]  # names of fixes up to this rung that were withheld
    trainer_fp32_lm_head: bool
    perturbs: bool  # the trainer moves its weights at this rung (and pushes unless withheld)
    trainer_kernels: bool = False  # the trainer scores with the engine's kernels (bitwise)
    trainer_replays_routes: bool = False  # MoE: the engine's routes replayed (routing-replay)

    def engine_overrides(self, seed: int) -> dict:
        overrides: dict = {}
        for fix in self.fixes:
            overrides |= fix.engine
            if fix.name == "explicit-runtime":
                overrides["seed"] = seed
        return overrides

    @property
    def pushes(self) -> bool:
        return any(f.pushes_weights for f in self.fixes)


def build_ladder(withhold: frozenset[str] = frozenset(), bitwise: bool = False,
                 moe: bool = False) -> list[Rung]:
    """The rungs in order; `moe` adds routing-replay (a mixture-of-experts model)."""
    fixes = FIXES + [ROUTING] if moe else FIXES
    rungs = [Rung(BASELINE, "baseline", (), (), False, False)]
    for i, fix in enumerate(fixes):
        upto = fixes[: i + 1]
        rungs.append(Rung(
            fix.name, fix.layer,
            fixes=tuple(f for f in upto if f.name not in withhold),
            withheld=tuple(f.name for f in upto if f.name in withhold),
            trainer_fp32_lm_head=any(f.trainer_fp32_lm_head for f in upto),
            perturbs=any(f.pushes_weights for f in upto),
            trainer_replays_routes=any(f.trainer_replays_routes and f.name not in withhold
                                       for f in upto),
        ))
    if bitwise:
        last = rungs[-1]
        rungs.append(Rung(BITWISE.name, BITWISE.layer, last.fixes + (BITWISE,), last.withheld,
                          trainer_fp32_lm_head=True, perturbs=True, trainer_kernels=True))
    return rungs


@dataclass
class LadderConfig:
    """What the ladder measures with: a resolved model folder, its prompts and samplings (the
    `parityrl doctor` options are doctor/config.py's DoctorConfig, which builds one of these)."""

    model: str
    dtype: str = "float32"
    # Every rung is measured under each of these (sampling is per request: one engine serves all).
    samplings: list[SamplingConfig] = field(
        default_factory=lambda: [SamplingConfig(temperature=0.7, max_tokens=32)])
    prompts: list[str | Messages] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    # Render prompts with the tokenizer's chat template; None = when the tokenizer has one.
    chat_template: bool | None = None
    num_samples: int = 4
    seed: int = 0
    tol: float | None = None  # an absolute bound on the last rung's max |Δ|, instead of the rule
    # Relative size of the weight-sync rung's perturbation; None = 0.02 in float32, 0.1 in lower
    # precision, where a missed update must stand out from the dtype's own rounding.
    perturb_scale: float | None = None
    # Score every rung's tokens in float64 too: how far each side is from exact arithmetic. The
    # verdict rests on it. None = when the model has at most 1e9 parameters (8 bytes a parameter).
    fp64_reference: bool | None = None
    weight_transport: str = "shm_file"  # how pushes reach the engine (EngineSettings)
    withhold: frozenset[str] = frozenset()  # fixes left out (see the module docstring)
    sabotage_skip: frozenset[str] = frozenset()  # tests: leave these tensors out of the push
    max_model_len: int = 512
    # A random non-zero LoRA adapter of this rank on every linear of the decoder (B = 0 would
    # test nothing): the engine holds the adapter, pushed after it starts; the weight-sync rung
    # moves the adapter, not the base. None = no adapter.
    lora_rank: int | None = None
    lora_b_std: float = 0.02  # B ~ N(0, std²); alpha = 2·rank

    @property
    def perturbation(self) -> float:
        if self.perturb_scale is not None:
            return self.perturb_scale
        return 0.02 if self.dtype == "float32" else 0.1

    def __post_init__(self) -> None:
        problem = withhold_problem(self.withhold)
        if problem:
            raise UserError(problem)


@dataclass
class RungResult:
    name: str
    layer: str
    sampling: SamplingConfig
    settings: dict  # what vLLM resolved, plus the trainer's side
    metrics: dict
    abs_diffs: list[float]  # per token, for the report's plots
    positions: list[int]  # completion position of each token
    withheld: tuple[str, ...] = ()
    sync_check: str | None = None
    sync_ok: bool | None = None
    # |lp − lp_float64| per side over the finite tokens (mean, p99, max); None without float64.
    engine_error: dict | None = None
    trainer_error: dict | None = None
    prefix_reuse_possible: bool = False  # prefix caching on across a weight update, no reset
