"""Every numerically relevant knob of the rollout engine, explicit and recorded.

The seed's bug lived in defaults nobody had written down (raw logprobs, prefix caching, a model-dtype
lm_head). Here each knob is a field with a documented value; `to_engine_args` is the only place that
translates them into vLLM arguments, and `resolved_engine_settings` reads back what vLLM made of
them, for the run directory.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from parityrl.weights import GLOO_BACKEND

Dtype = Literal["float32", "bfloat16", "float16"]


class EngineKnobs(BaseModel):
    """The engine section of a run config (`engine:`): every knob but what the run itself sets
    (model folder, dtype, seed). Defaults are the parity settings (the doctor's last rung).

    A numerics knob set to None is not passed to vLLM at all: vLLM's own default applies, and
    only `resolved_engine_settings` (the run's engine_settings.json) says what it was.
    """

    model_config = ConfigDict(extra="forbid")

    lm_head_dtype: Literal["model", "float32"] | None = Field(
        "float32", description="Dtype of the final projection (vLLM hf_overrides head_dtype)."
    )
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] | None = Field(
        "processed_logprobs",
        description="vLLM's default is raw_logprobs: logprobs of the unprocessed distribution.",
    )
    enable_prefix_caching: bool | None = Field(
        False, description="vLLM default on; cached prefixes survive weight updates."
    )
    async_scheduling: bool | None = Field(False, description="Recent vLLM default on; not batch invariant.")
    enable_chunked_prefill: bool | None = Field(False, description="Split long prefills across steps.")
    enforce_eager: bool | None = Field(True, description="No torch.compile / CUDA graphs.")
    generation_config: Literal["vllm", "auto"] | None = Field(
        "vllm",
        description="'auto' lets the model folder's generation_config.json change sampling defaults.",
    )
    cpu_attn_split_kv: bool | None = Field(
        None, description="CPU attention's split-KV decode (VLLM_CPU_ATTN_SPLIT_KV, vLLM default "
                          "on): its reduction order depends on the batch. Off in bitwise mode.")
    cpu_threads_bind: str | None = Field(
        None, description="CPU cores of the engine's worker threads, e.g. '0' or '0-3' "
                          "(VLLM_CPU_OMP_THREADS_BIND; None = vLLM's automatic binding). An "
                          "engine pool gives each engine its own core when unset.")
    pad_single_row_gemm: bool = Field(
        False, description="Run one-row GEMMs as two rows: oneDNN's M = 1 kernel rounds "
                           "differently from M >= 2 when K >= 1280. On in bitwise mode.")
    count_preemptions: bool = Field(
        False, description="Count the requests vLLM's scheduler preempts (a full KV cache: the "
                            "request is recomputed later as one prefill). Turns vLLM's stat "
                            "collection on. On in bitwise mode, whose layout a preemption breaks.")
    max_model_len: int = Field(256, ge=16, description="Prompt + completion token limit.")
    max_num_seqs: int = Field(256, ge=1, description="Sequences decoded concurrently.")
    max_num_batched_tokens: int = Field(4096, ge=16, description="Tokens per engine step.")
    kv_cache_gib: float = Field(0.5, gt=0, description="KV cache space in GiB, reserved at "
                                                       "engine start (vLLM's "
                                                       "kv_cache_memory_bytes; CPU: RAM, GPU: "
                                                       "VRAM).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM's "
                                          "gpu_memory_utilization: share of GPU memory the "
                                          "engine may use (GPU only).")
    weight_transport: Literal["shm_file", "gloo"] = Field(
        "shm_file", description="How updates reach the engine: a shared-memory file (same host) or "
                                "a gloo broadcast through vLLM's weight-transfer API (any host).")
    weight_transport_address: str = Field(
        "127.0.0.1", description="gloo: the trainer's address the engine's workers connect to.")
    max_lora_rank: int | None = Field(
        None, description="LoRA: the largest adapter rank the engine holds (one of vLLM's "
                          "choices; a run with trainer.lora sets it). None = no LoRA.")
    record_routes: bool = Field(
        True, description="Mixture-of-experts models: record the experts each token was routed "
                          "to, per layer, on every rollout (engine/routes.py; the trainer's "
                          "route_disagreement and moe_routing=replay use them). Dense: no effect.")
    executor: Literal["uni", "mp"] = Field(
        "uni", description="Where the model runs: 'uni' in vLLM's engine-core process, 'mp' in a "
                           "worker process of its own (vLLM's CPU choice). 'uni' starts one "
                           "process, not two (about 5 s less per engine start here); the worker's "
                           "OpenMP threads and cores are the same (vLLM's own placement).")
    start_method: Literal["template", "spawn"] = Field(
        "template", description="How the engine-core process starts: 'template' (forked from a "
                                "process of this run that imported vLLM once, "
                                "engine/template.py: a restart, or the next engine, starts in "
                                "~1.7 s instead of ~9 s here) or 'spawn' (vLLM's CPU choice: a "
                                "fresh interpreter that imports vLLM). Same tokens and logprobs "
                                "(docs/long-runs.md). In a Ray actor: spawn.")
    worker_extension: str = Field(
        "parityrl.engine.worker_extension.WeightSyncExtension",
        description="Worker mixin that loads pushed weights in place.",
    )


class EngineSettings(EngineKnobs):
    """Settings of one vLLM V1 engine: the knobs plus model folder, dtype and seed."""

    model: str = Field(description="Path of a Hugging Face model folder.")
    dtype: Dtype = Field("float32", description="Weights and activations dtype.")
    seed: int | None = Field(0, description="Engine seed (requests may carry their own).")
    runner: Literal["generate", "pooling"] = Field(
        "generate", description="generate: a policy or judge that samples tokens; pooling: a "
                                "sequence-classification reward model that scores them "
                                "(engine/pooling.py).")

    @classmethod
    def vllm_defaults(cls, model: str, **overrides) -> "EngineSettings":
        """What a user gets from vLLM V1 without saying anything (the doctor's first rung):
        every numerics knob left to vLLM. Model, dtype and the resource limits are still passed."""
        unset = {name: None for name in NUMERICS_KNOBS}
        return cls(**{"model": model, **unset, **overrides})

    def engine_environment(self) -> dict[str, str]:
        """Environment variables the engine's processes must start with (vLLM reads them there)."""
        env = {}
        if self.cpu_attn_split_kv is not None:
            env["VLLM_CPU_ATTN_SPLIT_KV"] = "1" if self.cpu_attn_split_kv else "0"
        if self.cpu_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_threads_bind
        return env

    def to_engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        return AsyncEngineArgs(**self.engine_kwargs())

    def engine_kwargs(self) -> dict:
        """The vLLM engine arguments, as keywords (`vllm.LLM(**kwargs)` takes the same).

        Knobs left at None are omitted, so vLLM applies its own default.
        """
        numerics = dict(
            hf_overrides=None if self.lm_head_dtype is None else {"head_dtype": self.lm_head_dtype},
            logprobs_mode=self.logprobs_mode,
            enable_prefix_caching=self.enable_prefix_caching,
            async_scheduling=self.async_scheduling,
            enable_chunked_prefill=self.enable_chunked_prefill,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            generation_config=self.generation_config,
        )
        if self.runner == "pooling":  # no sampling: logprobs and generation defaults mean nothing
            numerics.update(logprobs_mode=None, generation_config=None)
        return dict(
            model=self.model,
            tokenizer=self.model,
            runner=self.runner,
            dtype=self.dtype,
            **{k: v for k, v in numerics.items() if v is not None},
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_memory_bytes=int(self.kv_cache_gib * (1 << 30)),
            gpu_memory_utilization=self.gpu_memory_utilization,
            worker_extension_cls=self.worker_extension,
            **({"weight_transfer_config": {"backend": GLOO_BACKEND}}
               if self.weight_transport == "gloo" else {}),
            # One adapter slot, and every request carries the adapter: a request without one
            # is slot -1, which vLLM 0.32's CPU LoRA ops read as the last slot (vllm PR #48421).
            **({"enable_lora": True, "max_lora_rank": self.max_lora_rank, "max_loras": 1,
                "max_cpu_loras": 1} if self.max_lora_rank else {}),
            tensor_parallel_size=1,
            disable_log_stats=True,
        )



# The fields that change what the engine computes or reports; None leaves them to vLLM.
NUMERICS_KNOBS = ("lm_head_dtype", "logprobs_mode", "enable_prefix_caching", "async_scheduling",
                  "enable_chunked_prefill", "enforce_eager", "seed", "generation_config",
                  "cpu_attn_split_kv")


# What bitwise parity (parity.mode=bitwise, doctor --bitwise) needs of the engine: the layout the
# trainer's kernel pass reproduces (trainer/engine_kernels.py) and nothing that reorders a sum.
BITWISE_KNOBS = {"enforce_eager": True, "enable_chunked_prefill": False,
                 "enable_prefix_caching": False, "async_scheduling": False,
                 "logprobs_mode": "processed_logprobs", "cpu_attn_split_kv": False,
                 "pad_single_row_gemm": True, "count_preemptions": True}


def resolved_engine_settings(vllm_config) -> dict:
    """What vLLM actually resolved, read back from its VllmConfig (not what we asked for)."""
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    sched = vllm_config.scheduler_config
    return {
        "vllm_version": _vllm_version(),
        "device": str(vllm_config.device_config.device),
        "model": model.model,
        "dtype": str(model.dtype).removeprefix("torch."),
        "head_dtype": str(model.head_dtype).removeprefix("torch."),
        "logprobs_mode": model.logprobs_mode,
        "enforce_eager": model.enforce_eager,
        "seed": model.seed,
        "max_model_len": model.max_model_len,
        "generation_config": model.generation_config,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "kv_cache_memory_bytes": cache.kv_cache_memory_bytes,
        "block_size": cache.block_size,
        "async_scheduling": sched.async_scheduling,
        "enable_chunked_prefill": sched.enable_chunked_prefill,
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "compilation_mode": str(vllm_config.compilation_config.mode),
        "executor": vllm_config.parallel_config.distributed_executor_backend,
        "runner": model.runner_type,
        # A reward model's pooler: which token it reads, and whether vLLM applies an activation
        # (a sigmoid for one label) by default; None for a generating engine.
        "pooler": None if model.pooler_config is None else {
            "seq_pooling_type": model.pooler_config.seq_pooling_type,
            "use_activation": model.pooler_config.use_activation},
        "worker_extension_cls": vllm_config.parallel_config.worker_extension_cls,
        "weight_transfer_backend": getattr(vllm_config.weight_transfer_config, "backend", None),
        "lora": None if vllm_config.lora_config is None else {
            "max_lora_rank": vllm_config.lora_config.max_lora_rank,
            "max_loras": vllm_config.lora_config.max_loras,
            "lora_dtype": str(vllm_config.lora_config.lora_dtype).removeprefix("torch.")},
        # Sampling defaults the model folder imposes on requests that leave them unset (vLLM's
        # OpenAI server, LLM.get_default_sampling_params()); empty with generation_config="vllm".
        "generation_config_sampling_defaults": model.get_diff_sampling_param(),
    }


def _vllm_version() -> str:
    import vllm

    return vllm.__version__
