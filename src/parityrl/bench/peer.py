"""The side-by-side with TRL: `parityrl bench --only peer` (needs the optional extra `peer`).

Four arms, one after the other, each in a process of its own (bench/peer_arms.py): TRL's
GRPOTrainer with HF `generate`, TRL colocated with vLLM, parityrl sync and parityrl async, on the
same model, prompts, reward and hyper-parameters. Afterwards one evaluator, the same for every
arm, scores each arm's weight snapshots on the task's held-out problems (greedy, float32,
transformers `generate`): its time is in no arm's clock. Reported per arm: completions/s,
tokens/s, start-up time, wall time to each accuracy threshold and to the accuracy the best TRL
arm ends at, accuracy at equal wall time, and the logprob mismatch (TRL's own metric, and
parityrl's measure on TRL's vLLM samples). Plot: accuracy and reward against wall seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from parityrl.bench.peer_arms import ARMS, PeerSpec, demo_task
from parityrl.core.errors import UserError
from parityrl.core.sampling import SamplingConfig
from parityrl.doctor.ladder import RungResult
from parityrl.doctor.verdict import settings_faults
from parityrl.models.builtin import resolve_model
from parityrl.models.load import load_policy
from parityrl.models.tokenizer import load_tokenizer
from parityrl.rollouts.evaluate import model_greedy_accuracy
from parityrl.trainer.layout import to_model_layout


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
    """Greedy held-out accuracy of a weights file: the same for every arm."""

    def __init__(self, spec: PeerSpec) -> None:
        folder = str(resolve_model(spec.model))
        self.model = load_policy(folder, "float32").eval()
        self.tokenizer = load_tokenizer(folder)
        self.task = demo_task()
        self.problems = self.task.eval_problems()[: spec.eval_size]
        self.max_tokens = spec.max_tokens

    def accuracy(self, weights: Path) -> float:
        from safetensors.torch import load_file

        self.model.load_state_dict(to_model_layout(self.model, load_file(str(weights))),
                                   strict=False)
        return model_greedy_accuracy(self.model, self.tokenizer, self.task, self.problems,
                                     self.max_tokens)


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


def summarize(spec: PeerSpec, arms: dict[str, dict], curves: dict[str, list[dict]],
              outs: dict[str, Path]) -> dict:
    """Per-arm numbers and the two ratios (parityrl async against the best TRL arm)."""
    table = {}
    for arm, info in arms.items():
        rows = timeline(outs[arm])
        if "error" in info or not rows:
            table[arm] = {"error": info.get("error", "no steps")}
            continue
        wall = rows[-1]["wall_s"]
        table[arm] = {
            "steps": len(rows), "wall_s": wall, "startup_s": info.get("startup_s"),
            "completions_per_s": sum(r["completions"] for r in rows) / wall,
            "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
            "final_accuracy": curves[arm][-1]["accuracy"],
            # Per stage, mean seconds a step after the first (the first fills the pipeline).
            "stage_seconds": {k: sum(r["stages"][k] for r in rows[1:]) / max(len(rows) - 1, 1)
                              for k in rows[0]["stages"]},
            "first_step_s": rows[0]["wall_s"],
            "time_to_threshold_s": {str(t): time_to(curves[arm], t) for t in spec.thresholds},
            "parity_mismatch": info.get("parity_mismatch"),
            "trl_mismatch": info.get("trl_mismatch"),
            "adapter": info.get("adapter"),
            "engine_dtype": (info.get("engine_settings") or {}).get("dtype"),
        }
        if arm == "trl-vllm" and info.get("engine_settings"):
            table[arm]["doctor_settings_verdict"] = settings_verdict(info["engine_settings"])
    done = [a for a in table if "error" not in table[a]]
    trl = [a for a in done if a.startswith("trl")]
    results: dict = {"spec": spec.model_dump(), "arms": table, "curves": curves}
    if trl and "parityrl-async" in done:
        best_rate = max(trl, key=lambda a: table[a]["completions_per_s"])
        results["peer_samples_ratio"] = (table["parityrl-async"]["completions_per_s"]
                                         / table[best_rate]["completions_per_s"])
        best_acc = max(trl, key=lambda a: table[a]["final_accuracy"])
        target = table[best_acc]["final_accuracy"]
        ours = time_to(curves["parityrl-async"], target)
        theirs = time_to(curves[best_acc], target)
        results["peer_target_accuracy"] = target
        results["peer_time_to_accuracy_ratio"] = (None if ours is None or not theirs
                                                  else ours / theirs)
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
    acc_ax.set(xlabel="wall seconds (training; evaluation excluded)",
               ylabel="held-out greedy accuracy", title="accuracy")
    reward_ax.set(xlabel="wall seconds", ylabel="mean reward of the step's samples",
                  title="reward")
    for ax in (acc_ax, reward_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(spec: PeerSpec | None = None, out: Path | None = None, say=print,
        arms: tuple[str, ...] = ARMS) -> dict:
    check_installed()
    spec = spec or PeerSpec()
    out = out or Path("bench") / "peer"
    outs = {arm: out / arm for arm in arms}
    infos = {}
    for arm in arms:
        say(f"peer: {arm} ({spec.steps} steps of {spec.prompts_per_step}×{spec.group_size})")
        infos[arm] = run_arm(arm, spec, outs[arm], say)
    say("peer: held-out accuracy of every snapshot (one evaluator)")
    evaluator = Evaluator(spec)
    start = evaluator.accuracy(next(resolve_model(spec.model).glob("*.safetensors")))
    curves = {arm: evaluate_arm(evaluator, outs[arm], start) if "error" not in infos[arm] else []
              for arm in arms}
    results = summarize(spec, infos, curves, outs)
    results["timelines"] = {arm: timeline(outs[arm]) for arm in arms}
    results["plot"] = str(plot(results, out / "peer.png"))
    (out / "peer.json").write_text(json.dumps(results, indent=2, default=str))
    # The bench's headline format (one measurement: median = min = max).
    for key in ("peer_samples_ratio", "peer_time_to_accuracy_ratio"):
        value = results.get(key)
        results[key] = None if value is None else {"median": value, "min": value, "max": value,
                                                   "n": 1}
    return {k: v for k, v in results.items() if k != "timelines"}
