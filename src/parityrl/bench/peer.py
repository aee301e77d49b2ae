"""The side-by-side with TRL: `parityrl bench --only peer` (needs the optional extra `peer`).

Two workloads (bench/peer_arms.py `WORKLOADS`): the demo's tiny model with completions of at
most 6 tokens, and a realistic one, SmolLM2-135M-Instruct on chat prompts with completions of
about a hundred tokens. Each runs four arms, one after the other, each in a process of its own:
TRL's GRPOTrainer with HF `generate`, TRL colocated with vLLM, parityrl sync and parityrl async,
on the same model, prompts, reward and hyper-parameters. Afterwards one evaluator, the same for
every arm, scores each arm's weight snapshots on the task's held-out problems (greedy, float32,
one vLLM engine): its time is in no arm's clock. Reported per arm: completions/s, tokens/s,
start-up time, seconds a step by stage, the model FLOPs each phase reached as a fraction of this
machine's measured matmul peak, wall time to each accuracy threshold and to the accuracy the
best TRL arm ends at, accuracy at equal wall time, and the logprob mismatch (TRL's own metric,
and parityrl's measure on TRL's vLLM samples) with its coverage. Plot: accuracy and reward
against wall seconds, one figure a workload.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from parityrl.bench.matmul_peak import (
    matmul_peak,
    model_flops_per_token,
    phase_fractions,
)
from parityrl.bench.peer_arms import ARMS, WORKLOADS, PeerSpec, all_cores, spec_task
from parityrl.bench.report import ENGINE_STAGE
from parityrl.core.errors import UserError
from parityrl.core.sampling import SamplingConfig
from parityrl.doctor.ladder import RungResult
from parityrl.doctor.verdict import settings_faults
from parityrl.engine.engine import RolloutEngine
from parityrl.engine.settings import EngineSettings
from parityrl.models.builtin import resolve_model
from parityrl.models.load import load_policy
from parityrl.models.tokenizer import load_tokenizer
from parityrl.rollouts.evaluate import greedy_accuracy
from parityrl.tasks.prompts import encode_problem
from parityrl.trainer.layout import checkpoint_state_dict, to_model_layout


def check_installed() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        raise UserError("bench --only peer needs TRL: PARITYRL_EXTRAS=peer make setup (the "
                        "optional extra `peer`, trl==1.16.0)") from None


def run_arm(arm: str, spec: PeerSpec, out: Path, say=print) -> dict:
    """One arm in its own process; its arm.json with `startup_s` (launch → first step)."""
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    command = [sys.executable, "-m", "parityrl.bench.peer_arms", arm, str(spec_path), str(out)]
    launched = time.time()
    with (out / "log.txt").open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    info = json.loads((out / "arm.json").read_text()) if (out / "arm.json").exists() else {
        "arm": arm, "error": f"exit code {code}, no arm.json (see {out / 'log.txt'})"}
    info["command"] = " ".join(command[1:])
    if info.get("first_step_at"):
        info["startup_s"] = info["first_step_at"] - launched
    info["exit_code"] = code
    say(f"  {arm}: " + (f"error: {info['error']}" if "error" in info else
                        f"start-up {info['startup_s']:.1f} s, {_steps(out)} steps"))
    return info


def _steps(out: Path) -> int:
    path = out / "timeline.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def timeline(out: Path) -> list[dict]:
    path = out / "timeline.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Evaluator:
    """Greedy held-out accuracy of weight snapshots, the same for every arm of a workload: one
    vLLM engine (float32, the parity settings, every core) loads each snapshot in turn."""

    def __init__(self, spec: PeerSpec) -> None:
        folder = str(resolve_model(spec.model))
        self.model = load_policy(folder, "float32").eval()
        self.tokenizer = load_tokenizer(folder)
        self.task = spec_task(spec)
        self.problems = self.task.eval_problems()[: spec.eval_size]
        self.max_tokens = spec.max_tokens
        self.loop = asyncio.new_event_loop()
        settings = EngineSettings(model=folder, dtype="float32", max_model_len=spec.max_model_len,
                                  cpu_threads_bind=all_cores())
        self.engine = self.loop.run_until_complete(RolloutEngine.start(settings))
        self.version = 0

    def accuracy(self, weights: Path | None = None) -> float:
        """Of `weights` (a safetensors file), or of the model folder's own weights (None)."""
        from safetensors.torch import load_file

        if weights is not None:
            self.model.load_state_dict(to_model_layout(self.model, load_file(str(weights))),
                                       strict=False)
            self.version += 1
            self.loop.run_until_complete(self.engine.update_weights(
                checkpoint_state_dict(self.model), version=self.version))
        return self.loop.run_until_complete(greedy_accuracy(
            self.engine, self.task, self.tokenizer, self.problems, self.max_tokens))

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.close())
        self.loop.close()


def evaluate_arm(evaluator: Evaluator, out: Path, start_accuracy: float) -> list[dict]:
    """(step, wall_s, accuracy) at step 0 and at every snapshot."""
    rows = {r["step"]: r for r in timeline(out)}
    points = [{"step": 0, "wall_s": 0.0, "accuracy": start_accuracy}]
    for snapshot in sorted((out / "snapshots").glob("step-*.safetensors")):
        step = int(snapshot.stem.split("-")[1])
        if step in rows:
            points.append({"step": step, "wall_s": rows[step]["wall_s"],
                           "accuracy": evaluator.accuracy(snapshot)})
    return points


def time_to(points: list[dict], target: float) -> float | None:
    return next((p["wall_s"] for p in points if p["accuracy"] >= target), None)


def accuracy_at(points: list[dict], seconds: float) -> float:
    return max((p["accuracy"] for p in points if p["wall_s"] <= seconds), default=0.0)


def arm_summary(spec: PeerSpec, arm: str, info: dict, rows: list[dict], curve: list[dict],
                physics: dict) -> dict:
    """One arm's numbers: rates, seconds a step by stage, phases against the matmul peak."""
    wall = rows[-1]["wall_s"]
    row = {
        "steps": len(rows), "wall_s": wall, "startup_s": info.get("startup_s"),
        "command": info.get("command"),
        "completions_per_s": sum(r["completions"] for r in rows) / wall,
        "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
        "completion_len_mean": sum(r["tokens"] for r in rows) / sum(r["completions"]
                                                                  for r in rows),
        "final_accuracy": curve[-1]["accuracy"],
        # Per stage, mean seconds a step after the first (the first fills the pipeline).
        "stage_seconds": {k: sum(r["stages"][k] for r in rows[1:]) / max(len(rows) - 1, 1)
                          for k in rows[0]["stages"]},
        "first_step_s": rows[0]["wall_s"],
        "time_to_threshold_s": {str(t): time_to(curve, t) for t in spec.thresholds},
        "parity_mismatch": info.get("parity_mismatch"),
        "trl_mismatch": info.get("trl_mismatch"),
        "adapter": info.get("adapter"),
        "settings": info.get("settings"),
        "engine_dtype": (info.get("engine_settings") or {}).get("dtype"),
        "phases": phase_fractions(rows, ENGINE_STAGE[arm], info.get("cores") or {
            "engine": physics["cores"], "trainer": physics["cores"]}, physics["peak_gflops"],
            physics["flops_per_token"], physics["prompt_len_mean"]),
    }
    if arm == "trl-vllm" and info.get("engine_settings"):
        row["doctor_settings_verdict"] = settings_verdict(info["engine_settings"])
    return row


def summarize(spec: PeerSpec, arms: dict[str, dict], curves: dict[str, list[dict]],
              outs: dict[str, Path], physics: dict) -> dict:
    """Per-arm numbers and the two ratios (parityrl's faster arm against TRL's)."""
    table = {}
    for arm, info in arms.items():
        rows = timeline(outs[arm])
        table[arm] = ({"error": info.get("error", "no steps")} if "error" in info or not rows
                      else arm_summary(spec, arm, info, rows, curves[arm], physics))
    done = [a for a in table if "error" not in table[a]]
    trl = [a for a in done if a.startswith("trl")]
    ours = [a for a in done if a.startswith("parityrl")]
    results: dict = {"spec": spec.model_dump(), "arms": table, "curves": curves,
                     "physics": physics}
    if trl and ours:
        def rate(a: str) -> float:
            return table[a]["completions_per_s"]

        fast_trl, fast_ours = max(trl, key=rate), max(ours, key=rate)
        results["peer_samples_ratio"] = rate(fast_ours) / rate(fast_trl)
        best_acc = max(trl, key=lambda a: table[a]["final_accuracy"])
        target = table[best_acc]["final_accuracy"]
        mine, theirs = time_to(curves[fast_ours], target), time_to(curves[best_acc], target)
        results |= {"peer_arms_compared": [fast_ours, fast_trl, best_acc],
                    "peer_target_accuracy": target,
                    "peer_time_to_accuracy_ratio": (None if mine is None or not theirs
                                                    else mine / theirs)}
        equal = min(table[a]["wall_s"] for a in done)
        results["accuracy_at_equal_wall_s"] = {
            "seconds": equal, **{a: accuracy_at(curves[a], equal) for a in done}}
    return results


def settings_verdict(resolved: dict, trainer_dtype: str = "float32") -> str:
    """The doctor's settings check (doctor/verdict.py `settings_faults`) on an engine another
    framework set up, against a trainer that scores in `trainer_dtype` with a model-dtype
    lm_head (as TRL's does): PASS, or the faults by layer."""
    settings = resolved | {"trainer_dtype": trainer_dtype, "trainer_fp32_lm_head": False}
    faults = settings_faults(RungResult("peer", "peer", SamplingConfig(), settings, {}, [], []))
    if not faults:
        return "PASS: no numerics setting differs between engine and trainer"
    return "FAIL at the " + "; ".join(f"{layer} layer: {why}" for layer, why in faults)


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, reward_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, points in results["curves"].items():
        if not points:
            continue
        acc_ax.plot([p["wall_s"] for p in points], [p["accuracy"] for p in points], marker="o",
                    label=arm)
    for arm, rows in results.get("timelines", {}).items():
        reward_ax.plot([r["wall_s"] for r in rows], [r["reward_mean"] for r in rows], label=arm)
    spec = results["spec"]
    acc_ax.set(xlabel="wall seconds (training; evaluation excluded)",
               ylabel="held-out greedy accuracy",
               title=f"{spec['workload']}: {spec['model']}, ≤ {spec['max_tokens']} tokens")
    reward_ax.set(xlabel="wall seconds", ylabel="mean reward of the step's samples",
                  title="reward")
    for ax in (acc_ax, reward_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def physics_of(spec: PeerSpec, evaluator: Evaluator, peaks: dict) -> dict:
    """What the matmul-peak fractions need: model FLOPs a token, prompt length, the peaks."""
    problems = [evaluator.task.train_problem(i) for i in range(32)]
    prompt_len = sum(len(encode_problem(evaluator.tokenizer, p)) for p in problems) / 32
    return {"flops_per_token": model_flops_per_token(evaluator.model),
            "prompt_len_mean": prompt_len, "peak_gflops": peaks, "cores": os.cpu_count()}


def run_workload(spec: PeerSpec, out: Path, peaks: dict, say=print,
                 arms: tuple[str, ...] = ARMS) -> dict:
    """The arms of one workload one after the other, then the shared evaluator."""
    outs = {arm: out / arm for arm in arms}
    infos = {}
    for arm in arms:
        say(f"peer [{spec.workload}]: {arm} ({spec.steps} steps of "
            f"{spec.prompts_per_step}×{spec.group_size}, ≤ {spec.max_tokens} tokens)")
        infos[arm] = run_arm(arm, spec, outs[arm], say)
    say(f"peer [{spec.workload}]: held-out accuracy of every snapshot (one evaluator)")
    evaluator = Evaluator(spec)
    try:
        start = evaluator.accuracy()
        curves = {arm: evaluate_arm(evaluator, outs[arm], start)
                  if "error" not in infos[arm] else [] for arm in arms}
        physics = physics_of(spec, evaluator, peaks)
    finally:
        evaluator.close()
    results = summarize(spec, infos, curves, outs, physics)
    results["timelines"] = {arm: timeline(outs[arm]) for arm in arms}
    results["plot"] = str(plot(results, out / "peer.png"))
    (out / "peer.json").write_text(json.dumps(results, indent=2, default=str))
    return {k: v for k, v in results.items() if k != "timelines"}


def run(out: Path | None = None, say=print, workloads: tuple[str, ...] = ("tiny", "realistic"),
        arms: tuple[str, ...] = ARMS) -> dict:
    """Every workload; the realistic one's ratios are the stage's headline figures, the tiny
    one's carry the suffix `_tiny`."""
    check_installed()
    out = out or Path("bench") / "peer"
    say("peer: float32 matmul peak on 1.."f"{os.cpu_count()} cores")
    peaks = {str(n): matmul_peak(n) for n in range(1, (os.cpu_count() or 1) + 1)}
    results: dict = {"matmul_peak_gflops": peaks, "workloads": {}}
    for name in workloads:
        data = run_workload(WORKLOADS[name], out / name, peaks, say, arms)
        results["workloads"][name] = data
        suffix = "" if name == "realistic" else f"_{name}"
        for key in ("peer_samples_ratio", "peer_time_to_accuracy_ratio"):
            value = data.get(key)
            # The bench's headline format (one measurement: median = min = max).
            results[key + suffix] = None if value is None else {
                "median": value, "min": value, "max": value, "n": 1}
    return results
