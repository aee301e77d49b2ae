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
    "peer_samples_ratio": ("completions/s, parityrl async ÷ the faster TRL arm (stage peer)",
                           (">=", 1.5)),
    "peer_time_to_accuracy_ratio": ("seconds to the accuracy the best TRL arm ends at, parityrl "
                                    "async ÷ that TRL arm (stage peer)", ("<=", 0.67)),
}


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
    """The side-by-side with TRL, one row an arm (bench/peer.py)."""
    spec = peer["spec"]
    lines = [f"Side by side with TRL ({spec['steps']} steps of {spec['prompts_per_step']} prompts "
             f"× {spec['group_size']}, {spec['model']}; accuracy by one evaluator, its time "
             "excluded):", "",
             "| arm | completions/s | tokens/s | start-up s | wall s | final accuracy | s to "
             "TRL's final accuracy | engine dtype | mismatch mean \\|Δ\\| (parityrl's measure) |",
             "|---|---|---|---|---|---|---|---|---|"]
    target = peer.get("peer_target_accuracy")
    for arm, r in peer["arms"].items():
        if "error" in r:
            lines.append(f"| {arm} | error: {r['error']} | | | | | | | |")
            continue
        reach = next((p["wall_s"] for p in peer["curves"][arm]
                      if target is not None and p["accuracy"] >= target), None)
        mismatch = (r.get("parity_mismatch") or {}).get("mean_abs_diff")
        lines.append(f"| {arm} | {r['completions_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['startup_s']:.1f} | {r['wall_s']:.1f} | {r['final_accuracy']:.3f} | "
                     f"{'—' if reach is None else f'{reach:.1f}'} | {r.get('engine_dtype') or '—'} "
                     f"| {'—' if mismatch is None else f'{mismatch:.2e}'} |")
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
