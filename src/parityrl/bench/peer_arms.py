"""One arm of the side-by-side with TRL (`parityrl bench --only peer`), in a process of its own.

    python -m parityrl.bench.peer_arms ARM SPEC.json OUT_DIR

ARM is trl-generate (TRL's GRPOTrainer sampling with HF `generate`), trl-vllm (TRL colocated
with vLLM, as TRL sets it up), parityrl-sync or parityrl-async. Every arm trains the same model
folder on the same prompts in the same order with the same reward, group size, prompts a step,
max tokens, sampling (T = 1, no top-p/top-k), optimizer, constant learning rate, token-mean loss
aggregation and seed (`PeerSpec`), and writes to OUT_DIR:

    timeline.jsonl     one row a step: wall seconds since the first step began (snapshots
                       excluded), completions, tokens, reward mean
    snapshots/         the weights at every `eval_every` steps (scored afterwards by one shared
                       evaluator: peer.py)
    arm.json           when the first step began (time.time; the caller knows when it launched
                       the process), the engine settings vLLM resolved, the mismatch measured,
                       the error when the arm could not run

A process per arm: vLLM's and torch.distributed's global state (TRL's colocate mode starts both)
never leak from one arm into the next, and arms never run at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel

from parityrl.config import build_config
from parityrl.core.mismatch import mismatch_metrics
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.engine.settings import resolved_engine_settings
from parityrl.models.builtin import resolve_model
from parityrl.models.load import load_policy
from parityrl.models.tokenizer import load_tokenizer
from parityrl.models.warm_start import DEMO_TASK
from parityrl.pipeline import run_training
from parityrl.tasks.base import Problem
from parityrl.tasks.registry import build_task
from parityrl.trainer.batch import rollout_logprobs

ARMS = ("trl-generate", "trl-vllm", "parityrl-sync", "parityrl-async")


class PeerSpec(BaseModel):
    """One workload of the side-by-side: what every arm trains, on what, for how long."""

    workload: str = "tiny"
    model: str = "builtin:arithmetic-warm"
    task: dict = DEMO_TASK  # a run config's `task:` section
    steps: int = 60
    prompts_per_step: int = 64
    group_size: int = 8
    max_tokens: int = 6
    max_model_len: int = 128  # prompt + completion, every engine
    lr: float = 1e-3
    seed: int = 0
    eval_every: int = 10
    eval_size: int = 500
    thresholds: list[float] = [0.45, 0.50, 0.55]
    # Completions in one TRL forward/backward (TRL's per_device_train_batch_size; the rest of a
    # step's completions are gradient accumulation). None: all of them at once.
    trl_microbatch: int | None = None
    # Config overrides of the parityrl arms, by arm ("parityrl-sync", "parityrl-async").
    parityrl: dict[str, dict] = {}


def all_cores() -> str:
    """This process's cores in VLLM_CPU_OMP_THREADS_BIND's form ("0-1" or "0,2,5")."""
    cores = sorted(os.sched_getaffinity(0))
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


# The realistic workload: a pretrained instruct model, chat prompts asking for the steps of a
# one-digit sum, difference or product, completions of about a hundred tokens (T = 1, at most
# 128), and the task's verifiable reward (the completion's last number is the answer).
REALISTIC_TASK = {"type": "arithmetic", "digits": 1, "ops": ["+", "-", "*"],
                  "eval_fraction": 0.3, "eval_size": 64, "chat_template": True,
                  "chat_prompt": "What is {a} {op} {b}? Explain your steps, then give the final "
                                 "answer."}

# The trainer's lean step, in both workloads' parityrl arms (trainer/config.py): groups whose
# advantages are all exactly 0 skip forward and backward, micro-batches cut from rollouts
# sorted by length.
LEAN_STEP = {"skip_zero_advantage": True, "sort_by_length": True}

WORKLOADS = {
    "tiny": PeerSpec(eval_every=15, parityrl={
        "parityrl-sync": {"trainer": LEAN_STEP}, "parityrl-async": {"trainer": LEAN_STEP}}),
    "realistic": PeerSpec(
        workload="realistic", model="builtin:smollm2-135m-instruct", task=REALISTIC_TASK,
        steps=10, prompts_per_step=4, max_tokens=128, max_model_len=256, lr=3e-5,
        eval_every=5, eval_size=64, thresholds=[0.55, 0.6, 0.65], trl_microbatch=8,
        parityrl={
            # Micro-batches small enough for 135M parameters × a 49k vocabulary in 24 GiB.
            # Sync: the engine generates on every core while the trainer waits (vLLM's own
            # binding leaves one idle), and the trainer uses them all while the engine waits.
            "parityrl-sync": {"trainer": LEAN_STEP | {"optim": {"tokens_per_microbatch": 2048}},
                              "engine": {"cpu_threads_bind": all_cores()}},
            # Async: the parity probe scores one group of the next step's rollouts.
            "parityrl-async": {"trainer": LEAN_STEP | {"optim": {"tokens_per_microbatch": 2048}},
                               "parity": {"probe_rollouts": 8}},
        }),
}


def spec_task(spec: PeerSpec):
    return build_task(build_config({"task": spec.task}).task)


class Timeline:
    """Per-step rows and snapshots; the clock stops while a snapshot is written."""

    def __init__(self, out: Path, spec: PeerSpec) -> None:
        self.out, self.spec = out, spec
        (out / "snapshots").mkdir(parents=True, exist_ok=True)
        self.file = (out / "timeline.jsonl").open("w")
        self.started: float | None = None
        self.first_step_at: float | None = None
        self.paused = 0.0

    def start(self, seconds_ago: float = 0.0) -> None:
        """The first step began (`seconds_ago` seconds ago); its wall-clock time (time.time)
        goes to arm.json, from which the caller reckons the start-up time."""
        self.started = time.perf_counter() - seconds_ago
        self.first_step_at = time.time() - seconds_ago

    def step(self, step: int, completions: int, tokens: int, reward: float, weights=None,
             **stages: float) -> None:
        """`stages`: seconds of this step by stage (what each arm can tell apart); `weights`:
        a callable giving the state dict to snapshot, None when the arm keeps its own."""
        wall = time.perf_counter() - self.started - self.paused
        self.file.write(json.dumps({"step": step, "wall_s": wall, "completions": completions,
                                    "tokens": tokens, "reward_mean": reward,
                                    "stages": stages}) + "\n")
        self.file.flush()
        if weights is not None and (step % self.spec.eval_every == 0 or step == self.spec.steps):
            pause = time.perf_counter()
            self.snapshot(step, weights())
            self.paused += time.perf_counter() - pause

    def snapshot(self, step: int, state: dict) -> None:
        from safetensors.torch import save_file

        save_file({n: t.detach().float().contiguous().clone() for n, t in state.items()},
                  str(self.out / "snapshots" / f"step-{step:06d}.safetensors"))


# -- TRL ------------------------------------------------------------------------------------------

def _sync_through_inplace_reload(generation) -> None:
    """TRL's colocate `sync_weights`, through vLLM's in-place reloader.

    As installed, TRL calls `model.load_weights` on the engine's model; on vLLM's CPU backend
    every linear's weight has been replaced by its GEMM dispatch and has no `weight_loader`, so
    the first sync raises `AttributeError: 'Parameter' object has no attribute 'weight_loader'`.
    `model_runner.reload_weights(weights_iterator=...)` (vLLM 0.32) loads the same tensors and
    redoes the CPU repack. The rest of TRL's method is kept as it is: the cache reset."""
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=generation._iter_named_params())
    generation.llm.reset_prefix_cache()


# How the TRL arms differ from a plain TRL user's GRPOConfig, and why.
TRL_SETTINGS = [
    "use_cpu=True, bf16=False: float32 on CPU, as every arm",
    "per_device_train_batch_size × gradient_accumulation_steps = a step's completions: one "
    "generation batch and one optimizer step a step, as every arm",
    "shuffle_dataset=False: the same prompts in the same order as every arm",
    "beta=0.0, loss_type='dapo', epsilon=0.2, constant lr, num_iterations=1: the common recipe",
    "disable_dropout=True, save_strategy='no', report_to=[]: nothing beside the work",
]
TRL_VLLM_SETTINGS = [
    "vllm_mode='colocate': no second machine or server process",
    "vllm_max_model_length = the workload's prompt + completion limit",
    "vllm_gpu_memory_utilization=0.1: ignored on CPU (KV space from VLLM_CPU_KVCACHE_SPACE)",
    "sync_weights through vLLM's in-place reloader: TRL's own call fails on the CPU backend",
]


def run_trl(spec: PeerSpec, out: Path, use_vllm: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    folder = str(resolve_model(spec.model))
    task = spec_task(spec)
    rows = []
    for i in range(spec.prompts_per_step * spec.steps):
        problem = task.train_problem(i)
        # Chat problems go to TRL as conversations: it renders them with the same template.
        prompt = list(problem.messages) if problem.messages else problem.prompt
        rows.append({"prompt": prompt, "answer": problem.answer})

    def accuracy(prompts, completions, answer, **kwargs):  # the task's reward, TRL's signature
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [task.reward(Problem(0, "", a), t) for t, a in zip(texts, answer)]

    completions = spec.prompts_per_step * spec.group_size
    micro = spec.trl_microbatch or completions

    args = GRPOConfig(
        output_dir=str(out / "trl"), use_cpu=True, bf16=False, seed=spec.seed,
        num_generations=spec.group_size,
        per_device_train_batch_size=micro, gradient_accumulation_steps=completions // micro,
        max_completion_length=spec.max_tokens, temperature=1.0, top_p=1.0,
        learning_rate=spec.lr, lr_scheduler_type="constant", loss_type="dapo", beta=0.0,
        num_iterations=1, epsilon=0.2, shuffle_dataset=False, gradient_checkpointing=False,
        logging_steps=1, max_steps=spec.steps, report_to=[], save_strategy="no",
        disable_dropout=True, use_vllm=use_vllm, vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1, vllm_max_model_length=spec.max_model_len)
    timeline = Timeline(out, spec)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rollouts: list = []  # (prompt ids, completion ids, engine logprobs) of TRL's vLLM samples

    clock = {"generate": 0.0, "step_began": 0.0}

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if timeline.started is None:
                timeline.start()
            clock["step_began"], clock["generate"] = time.perf_counter(), 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                completions = spec.prompts_per_step * spec.group_size
                tokens = round(float(logs["completions/mean_length"]) * completions)
                step_s = time.perf_counter() - clock["step_began"]
                timeline.step(state.global_step, completions, tokens, float(logs["reward"]),
                              lambda: model.state_dict(), whole_step=step_s,
                              generate_and_score=clock["generate"],
                              train=step_s - clock["generate"])

    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=args,
                          train_dataset=Dataset.from_list(rows),
                          processing_class=load_tokenizer(folder), callbacks=[Record()])
    info: dict = {"arm": "trl-vllm" if use_vllm else "trl-generate",
                  "cores": {"engine": torch.get_num_threads(),
                            "trainer": torch.get_num_threads()},
                  "settings": TRL_SETTINGS + (TRL_VLLM_SETTINGS if use_vllm else [])}
    _time_generation(trainer, clock)
    if use_vllm:
        generation = trainer.vllm_generation
        info["engine_settings"] = resolved_engine_settings(generation.llm.llm_engine.vllm_config)
        info["adapter"] = ("sync_weights through vLLM's in-place reloader "
                           "(peer_arms._sync_through_inplace_reload)")
        generation.sync_weights = lambda: _sync_through_inplace_reload(generation)
        _record_vllm_samples(trainer, rollouts, spec)
    trainer.train()
    info["first_step_at"] = timeline.first_step_at
    history = trainer.state.log_history
    if use_vllm:
        info["trl_mismatch"] = {
            "mean": _mean(h.get("sampling/sampling_logp_difference/mean") for h in history),
            "max": max((h["sampling/sampling_logp_difference/max"] for h in history
                        if "sampling/sampling_logp_difference/max" in h), default=None)}
        info["parity_mismatch"] = _score_samples(rollouts, folder)
    return info


def _time_generation(trainer, clock: dict) -> None:
    """Add the seconds of TRL's sampling-and-scoring phase (generation, rewards, advantages)
    to `clock["generate"]`."""
    original = trainer._generate_and_score_completions

    def timed(inputs):
        began = time.perf_counter()
        try:
            return original(inputs)
        finally:
            clock["generate"] += time.perf_counter() - began

    trainer._generate_and_score_completions = timed


def _record_vllm_samples(trainer, rollouts: list, spec: PeerSpec) -> None:
    """Keep the first step's vLLM samples (token ids and the engine's logprobs), sampled by the
    model folder's weights (TRL syncs them before its first generation), for parityrl's own
    logprob function to score afterwards."""
    original = trainer._generate_and_score_completions

    def recorded(inputs):
        output = original(inputs)
        if not rollouts and "sampling_per_token_logps" in output:
            mask = output["completion_mask"].bool()
            for i in range(len(mask)):
                prompt = output["prompt_ids"][i][output["prompt_mask"][i].bool()].tolist()
                n = int(mask[i].sum())
                rollouts.append((prompt, output["completion_ids"][i][:n].tolist(),
                                 output["sampling_per_token_logps"][i][:n].tolist()))
        return output

    trainer._generate_and_score_completions = recorded


def _score_samples(rollouts: list, folder: str) -> dict | None:
    """TRL's vLLM samples scored by `token_logprobs` (the doctor's function) on the float32
    weights that sampled them: parityrl's mismatch measure applied to TRL's rollouts."""
    if not rollouts:
        return None
    model = load_policy(folder, "float32")
    items = [Rollout(p, c, lp, [0] * len(c), "length") for p, c, lp in rollouts if c]
    scored = rollout_logprobs(model, items, SamplingConfig(temperature=1.0), pad_id=0)
    trainer_lp = torch.cat([s.logprobs for s in scored])
    engine_lp = torch.tensor([x for r in items for x in r.logprobs], dtype=torch.float64)
    m = mismatch_metrics(trainer_lp, engine_lp)
    return {k.split("/", 1)[1]: v for k, v in m.items()}


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


# -- parityrl -------------------------------------------------------------------------------------

def run_parityrl(spec: PeerSpec, out: Path, mode: str) -> dict:
    timeline = Timeline(out, spec)
    run_dir = out / "run"
    cfg = build_config(_merged({
        "name": f"peer-{mode}", "seed": spec.seed, "max_steps": spec.steps, "mode": mode,
        "model": spec.model, "dtype": "float32",
        "sampling": {"temperature": 1.0, "max_tokens": spec.max_tokens},
        "task": spec.task,
        "actor": {"group_size": spec.group_size, "prompts_per_step": spec.prompts_per_step,
                  "max_lag": 1},
        "engine": {"max_model_len": spec.max_model_len},
        "trainer": {"optim": {"lr": spec.lr}, "loss": {"type": "ppo"}},
        "checkpoint": {"every": spec.eval_every, "keep": spec.steps},
        "parity": {"probe_wait_s": 0.0}, "eval_every": 0, "tensorboard": False},
        spec.parityrl.get(f"parityrl-{mode}", {})))

    def on_step(step: int, metrics: dict) -> None:
        if timeline.started is None:  # the first step's own time counts from its start
            timeline.start(seconds_ago=metrics["time/step_seconds"])
        completions = int(metrics["rl/samples"])
        step_s, train_s = metrics["time/step_seconds"], metrics["time/train_seconds"]
        push_s = metrics.get("sync/seconds", 0.0)
        timeline.step(step, completions, int(metrics["rl/tokens_sampled"]), metrics["rl/reward_mean"],
                      whole_step=step_s, train=train_s, push=push_s,
                      wait_for_rollouts=max(step_s - train_s - push_s, 0.0),
                      engine_busy=step_s * (1 - metrics["throughput/engine_idle_frac"]))

    run_training(cfg, run_dir, on_step=on_step, on_message=lambda m: None)
    # The run's checkpoints (every eval_every steps) are this arm's snapshots.
    for folder in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(folder.name.split("-")[1])
        (out / "snapshots" / f"step-{step:06d}.safetensors").symlink_to(
            (folder / "model.safetensors").resolve())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    parity = [r for r in rows if "mismatch/mean_abs_diff" in r]
    bind = cfg.engine.cpu_threads_bind
    return {"arm": f"parityrl-{mode}", "first_step_at": timeline.first_step_at,
            "settings": spec.parityrl.get(f"parityrl-{mode}", {}),
            # vLLM's own binding leaves one core to the rest when none is named.
            "cores": {"engine": _core_count(bind) if bind else max((os.cpu_count() or 2) - 1, 1),
                      "trainer": torch.get_num_threads()},
            "engine_settings": json.loads((run_dir / "engine_settings.json").read_text()),
            "parity_mismatch": {
                "mean_abs_diff": _mean(r["mismatch/mean_abs_diff"] for r in parity),
                "max_abs_diff": max((r["mismatch/max_abs_diff"] for r in parity), default=None),
                "kl_k3": _mean(r.get("mismatch/kl_k3") for r in parity),
                "tokens": sum(r.get("mismatch/tokens", 0) for r in parity),
            "steps_probed": len(parity), "steps": len(rows),
            # Tokens scored for parity ÷ tokens sampled, over the run.
            "coverage": (sum(r.get("mismatch/tokens", 0) for r in parity)
                         / max(sum(r.get("rl/tokens_sampled", 0) for r in rows), 1))}}


def _core_count(bind: str) -> int:
    """Cores named by a VLLM_CPU_OMP_THREADS_BIND value ("0-1", "0,2")."""
    count = 0
    for part in bind.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def _merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied, nested sections merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = (_merged(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def main(argv: list[str]) -> int:
    arm, spec_path, out = argv
    spec = PeerSpec.model_validate_json(Path(spec_path).read_text())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if arm == "trl-generate":
            info = run_trl(spec, out_dir, use_vllm=False)
        elif arm == "trl-vllm":
            info = run_trl(spec, out_dir, use_vllm=True)
        elif arm in ("parityrl-sync", "parityrl-async"):
            info = run_parityrl(spec, out_dir, arm.split("-")[1])
        else:
            raise SystemExit(f"unknown arm {arm!r}; one of {', '.join(ARMS)}")
    except Exception as e:  # recorded for the report, then the traceback for the log
        (out_dir / "arm.json").write_text(json.dumps(
            {"arm": arm, "error": f"{type(e).__name__}: {e}"}, indent=2, default=str))
        raise
    (out_dir / "arm.json").write_text(json.dumps(info, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
