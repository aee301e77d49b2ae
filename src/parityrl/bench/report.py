"""Bench results → results.json (every number) and results.md (the table the README quotes)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# headline key → (what it is, anchor, target as (op, value) or None)
HEADLINES = {
    "engine_start_uni_vs_mp": ("engine start seconds, executor uni ÷ mp (vLLM's CPU choice)",
                               None),
    "rollout_overhead_ratio": ("rollout tokens/s, parityrl ÷ raw vLLM LLM.generate", (">=", 0.95)),
    "weight_sync_vs_memcpy": ("in-place weight sync seconds ÷ memcpy seconds, largest model",
                              ("<=", 3.0)),
    "weight_handover_vs_memcpy": ("update seconds minus vLLM's own reload ÷ memcpy, largest "
                                  "model", ("<=", 1.5)),
    "logprob_pass_ratio": ("token_logprobs tokens/s ÷ plain forward + log_softmax (no grad)", None),
    "pipeline_vs_sync_samples_ratio": ("samples/s, mode async ÷ mode sync", (">=", 1.5)),
    "engine_idle_frac_async": ("fraction of time the engine has nothing in flight, async",
                               ("<", 0.10)),
    "bitwise_step_cost_ratio": ("trainer step seconds, parity.mode=bitwise ÷ default",
                                ("<=", 2.0)),
    "lora_sync_vs_full": ("seconds paused for a rank-8 all-linear adapter update ÷ a full-weight "
                          "update, SmolLM2-135M", ("<=", 0.1)),
    "lora_step_vs_full": ("trainer step seconds with the rank-8 adapter ÷ every weight "
                          "trainable, SmolLM2-135M", None),
    "peer_samples_ratio": ("completions/s, parityrl's faster arm ÷ TRL's faster arm, realistic "
                           "workload: SmolLM2-135M-Instruct, ~100-token completions (stage "
                           "peer)", (">=", 1.5)),
    "peer_time_to_accuracy_ratio": ("seconds to the accuracy TRL's best arm ends at, parityrl's "
                                    "faster arm ÷ that TRL arm, realistic workload (stage peer)",
                                    ("<=", 0.67)),
    "peer_samples_ratio_tiny": ("the same completions/s ratio, tiny workload: the demo's 2-layer "
                                "model, ≤ 6-token completions (stage peer)", (">=", 1.0)),
    "peer_time_to_accuracy_ratio_tiny": ("the same time-to-accuracy ratio, tiny workload "
                                         "(stage peer)", None),
}

# The stage holding a side-by-side arm's generation seconds (TRL: sampling and scoring, weight
# sync included in trl-vllm; parityrl sync: waiting for the batch; async: the engine's busy time).
ENGINE_STAGE = {"trl-generate": "generate_and_score", "trl-vllm": "generate_and_score",
                "parityrl-sync": "wait_for_rollouts", "parityrl-async": "engine_busy"}


def machine() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        info["memory_gib"] = round(kb / 2**20, 1)
    return info


def _meets(value: float, target) -> str:
    if target is None:
        return "—"
    op, bound = target
    ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
    return "yes" if ok else "**no**"


def markdown(results: dict) -> str:
    lines = ["# parityrl bench", "",
             f"Command: `{results['command']}` · machine: {results['machine'].get('cpu', '?')}, "
             f"{results['machine']['cpu_count']} cores, {results['machine'].get('memory_gib', '?')} "
             f"GiB · torch {results['machine']['torch']}, vllm {results['machine'].get('vllm', '?')}"
             f" · {results['seconds_total'] / 60:.1f} min", "",
             "| figure | median | spread [min, max] | n | target | met |",
             "|---|---|---|---|---|---|"]
    for key, (what, target) in HEADLINES.items():
        s = results.get(key)
        if s is None:
            continue
        bound = f"{target[0]} {target[1]:g}" if target else "—"
        lines.append(f"| `{key}`: {what} | {s['median']:.3g} | [{s['min']:.3g}, {s['max']:.3g}] "
                     f"| {s['n']} | {bound} | {_meets(s['median'], target)} |")
    stages = results["stages"]
    if "weight_sync" in stages:
        lines += ["", "Weight sync by model size (seconds, medians):", "",
                  "| size | MiB | sync | memcpy | sync ÷ memcpy | restart | trainer copy + digest "
                  "| worker digest | vLLM reload (copy + repack) | pause/RPC/resume |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in stages["weight_sync"]["sizes"].items():
            b = r["breakdown_seconds"]
            lines.append(f"| {name} | {r['bytes'] / 2**20:.1f} | {r['sync_seconds']['median']:.4f} "
                         f"| {r['memcpy_seconds']['median']:.4f} | "
                         f"{r['sync_vs_memcpy']['median']:.1f} | {r['restart_seconds']:.1f} | "
                         f"{b['trainer_copy_and_digest']:.4f} | {b['worker_digest']:.4f} | "
                         f"{b['vllm_reload']:.4f} | {b['pause_rpc_resume']:.4f} |")
    if "rollout" in stages:
        r = stages["rollout"]
        lines += ["", f"Rollout tokens/s: raw vLLM {r['raw_tokens_per_s']['median']:.0f}, "
                      f"parityrl {r['ours_tokens_per_s']['median']:.0f}."]
    if "logprob_pass" in stages:
        m = stages["logprob_pass"]["modes"]["with_backward"]
        lines += [f"Logprob pass with backward: ratio {m['ratio']['median']:.3g} "
                  f"(ours {m['ours_tokens_per_s']['median']:.0f} vs plain "
                  f"{m['plain_tokens_per_s']['median']:.0f} tokens/s)."]
    if "pipeline" in stages:
        p = stages["pipeline"]
        lines += [f"Pipeline samples/s: async {p['samples_per_s']['async']['median']:.1f}, sync "
                  f"{p['samples_per_s']['sync']['median']:.1f}; engine idle in sync mode "
                  f"{p['engine_idle_frac_sync']['median']:.0%}."]
    if "doctor" in stages:
        lines += [f"Doctor end to end (`{stages['doctor']['command']}`): "
                  f"{stages['doctor']['doctor_seconds']:.0f} s."]
    if "peer" in stages:
        lines += ["", *peer_table(stages["peer"])]
    return "\n".join(lines) + "\n"


def peer_table(peer: dict) -> list[str]:
    """The side-by-side with TRL, one table a workload, one row an arm (bench/peer.py)."""
    peaks = peer.get("matmul_peak_gflops") or {}
    lines = ["float32 matmul peak (torch.mm 2048², GFLOP/s): " + ", ".join(
        f"{n} core{'' if n == '1' else 's'} {v:.0f}" for n, v in peaks.items())]
    for name, workload in peer.get("workloads", {}).items():
        lines += ["", *_workload_table(name, workload)]
    return lines


def _workload_table(name: str, peer: dict) -> list[str]:
    spec = peer["spec"]
    lines = [f"Side by side with TRL, {name} ({spec['steps']} steps of {spec['prompts_per_step']} "
             f"prompts × {spec['group_size']}, {spec['model']}, ≤ {spec['max_tokens']} tokens; "
             "accuracy by one evaluator, its time excluded):", "",
             "| arm | completions/s | tokens/s | mean length | start-up s | wall s | final "
             "accuracy | s to TRL's final accuracy | engine, trainer % of matmul peak | "
             "mismatch mean \\|Δ\\| (coverage) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    target = peer.get("peer_target_accuracy")
    for arm, r in peer["arms"].items():
        if "error" in r:
            lines.append(f"| {arm} | error: {r['error']} | | | | | | | | |")
            continue
        reach = next((p["wall_s"] for p in peer["curves"][arm]
                      if target is not None and p["accuracy"] >= target), None)
        mismatch = r.get("parity_mismatch") or {}
        mean, coverage = mismatch.get("mean_abs_diff"), mismatch.get("coverage")
        phases = r.get("phases", {})
        peak = ", ".join(f"{phases[p]['fraction_of_peak']:.0%} ({phases[p]['cores']} "
                         f"core{'' if phases[p]['cores'] == 1 else 's'})"
                         if p in phases else "—" for p in ("engine", "trainer"))
        lines.append(
            f"| {arm} | {_rate(r['completions_per_s'])} | {r['tokens_per_s']:.0f} | "
            f"{r['completion_len_mean']:.0f} | {r['startup_s']:.1f} | {r['wall_s']:.1f} | "
            f"{r['final_accuracy']:.3f} | {'—' if reach is None else f'{reach:.1f}'} | {peak} | "
            f"{'—' if mean is None else f'{mean:.2e}'}"
            f"{'' if coverage is None else f' ({coverage:.0%})'} |")
    return lines + ["", *_stage_table(peer)]


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _stage_table(peer: dict) -> list[str]:
    """Mean seconds a step by stage, after the first step (TRL's generate stage includes
    scoring, and in trl-vllm the weight sync; parityrl's engine stage is sync's wait for the
    batch, async's engine busy time, beside the trainer)."""
    lines = ["| arm | generate | train | weight push | whole step |", "|---|---|---|---|---|"]
    for arm, r in peer["arms"].items():
        if "error" in r:
            continue
        st = r["stage_seconds"]
        push = f"{st['push']:.2f}" if "push" in st else "—"
        lines.append(f"| {arm} | {st.get(ENGINE_STAGE.get(arm, ''), 0.0):.2f} | {st['train']:.2f} | "
                     f"{push} | {st['whole_step']:.2f} |")
    return lines


def write(results: dict, out: Path) -> Path:
    """Write results.json at `out` and results.md beside it (atomically: a kill keeps the last)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(results, indent=2) + "\n"),
                       (out.with_suffix(".md"), markdown(results))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return out.with_suffix(".md")
