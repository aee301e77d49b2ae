"""The doctor's pass rule and its verdict in plain words.

A per-token absolute bound does not scale: on a 30-layer real model two correct float32
implementations differ by up to ~5e-5 on some tokens, in bfloat16 by ~0.3. What does scale is the
question a float64 evaluation of the same weights answers: is the engine as close to the exact
logprobs as the trainer itself is? A rung is *consistent* when

    engine error ≤ ENGINE_ERROR_FACTOR × trainer error       (mean and p99 of |lp − lp_float64|)

no token is non-finite and the weight push passed its digest check. The verdict is PASS when the
last rung is consistent and the two sides' settings agree (below). With `--tol` the last rung must
instead keep max |Δ| within that absolute bound; without a float64 evaluation (models over 1e9
parameters) a per-dtype default bound is used.

The doctor also knows both sides' settings (the engine's as vLLM resolved them), and a rung whose
settings disagree with the trainer's on a numerics knob fails whatever the numbers say: raw
logprobs against the trainer's processed ones, lm_heads in different dtypes, weights the trainer
moved but never pushed or that arrived incomplete (the digest check), prefix caching across a
weight update without a cache reset. Measurement
alone cannot always see the second in bfloat16 (on SmolLM2 truncated to 4 layers a bfloat16
engine head against the trainer's float32 one raised the engine's error only 1.4×).

On a failure the verdict names the layer: the first settings fault of the last rung, else the
rung from which on every rung is inconsistent (the first fix that should have made it consistent
when none ever was).
"""

from __future__ import annotations

from dataclasses import dataclass

from parityrl.doctor.rungs import FIXES, ROUTING, RungResult
from parityrl.trainer.engine_kernels import bitwise_setting_faults

# Measured on SmolLM2-135M-Instruct (README, "The doctor on a real model"): correctly configured,
# the CPU engine's mean and p99 error against float64 are 1.4–1.8× the trainer's in float32 at 30
# layers, 1.9–2.2× at 4 layers, 1.0–1.2× on the tiny models, 0.8–1.1× in bfloat16; raw logprobs
# are ~1e5× in float32 and ~10× in bfloat16, a missed weight update or a stale prefix cache ≥ 10×
# (README).
ENGINE_ERROR_FACTOR = 4.0
# Without a float64 evaluation: an absolute bound on the last rung's max |Δ| per dtype.
FALLBACK_TOL = {"float32": 1e-4, "bfloat16": 0.5, "float16": 0.1}
# Two error sizes below this are both "exact" (a ratio of zeros says nothing).
EXACT = 1e-12


@dataclass
class Consistency:
    ok: bool
    why: str  # one clause: what was compared, and the outcome
    ratio: float | None = None  # engine error / trainer error (the larger of mean and p99)


def consistency(r: RungResult) -> Consistency:
    """Is the engine as close to exact arithmetic as the trainer, at this rung?"""
    m = r.metrics
    if m.get("mismatch/nonfinite_tokens"):
        return Consistency(False, f"{m['mismatch/nonfinite_tokens']} tokens have a non-finite "
                                  "logprob on one side")
    if r.sync_ok is False:
        return Consistency(False, f"the weight push failed its digest check ({r.sync_check})")
    if r.engine_error is None or r.trainer_error is None:
        return Consistency(True, "no float64 evaluation")
    ratios = [_ratio(r.engine_error[k], r.trainer_error[k]) for k in ("mean", "p99")]
    ratio = max(ratios)
    ok = ratio <= ENGINE_ERROR_FACTOR
    why = (f"engine vs float64: mean {r.engine_error['mean']:.3g}, p99 "
           f"{r.engine_error['p99']:.3g}; trainer vs float64: mean "
           f"{r.trainer_error['mean']:.3g}, p99 {r.trainer_error['p99']:.3g} "
           f"({ratio:.3g}× {'≤' if ok else '>'} {ENGINE_ERROR_FACTOR:g}×)")
    return Consistency(ok, why, ratio)


def bitwise_consistency(r: RungResult) -> Consistency:
    """The bitwise rule: every token has exactly the engine's logprob (and none is non-finite)."""
    n_diff = sum(d != 0 for d in r.abs_diffs)
    finite = consistency(r)
    why = (f"every one of {len(r.abs_diffs)} tokens has exactly the engine's logprob"
           if n_diff == 0 else f"{n_diff} of {len(r.abs_diffs)} tokens differ, max |Δ| "
                               f"{r.metrics['mismatch/max_abs_diff']:.3g}")
    preempted = int(r.metrics.get("engine/preemptions", 0))
    if preempted:
        why += (f"; the engine preempted {preempted} requests (KV cache full) and recomputed "
                "them as one prefill, a layout the kernel pass does not reproduce: give it "
                "more engine.kv_cache_gib")
    if not finite.ok:
        why += f" ({finite.why})"
    return Consistency(n_diff == 0 and finite.ok, why, 0.0 if n_diff == 0 else None)


def settings_faults(r: RungResult) -> list[tuple[str, str]]:
    """(layer, why) for every numerics setting on which the engine and the trainer disagree."""
    s = r.settings
    faults = []
    if s.get("logprobs_mode") != "processed_logprobs":
        faults.append(("semantics", f"the engine reports {s.get('logprobs_mode')} (the "
                                    "distribution before temperature/top-k/top-p), the trainer "
                                    "the processed one"))
    if s.get("weights_pushed") is False:
        faults.append(("weight synchronisation",
                       "the trainer's new weights were never pushed to the engine"))
    if r.sync_ok is False:  # whichever rung it is: what the engine holds is not what was sent
        faults.append(("weight synchronisation",
                       f"the weight push failed its digest check ({r.sync_check})"))
    if r.prefix_reuse_possible:
        faults.append(("weight synchronisation",
                       "prefix caching is on and the cache was not reset after the weight "
                       "update: prompts cached under the old weights are reused"))
    if r.name == "bitwise":
        faults += [("kernels", f"the engine runs {fault}, which the trainer's kernel pass "
                               "does not reproduce") for fault in bitwise_setting_faults(s)]
    engine_dtype, trainer_dtype = s.get("dtype"), s.get("trainer_dtype")
    if engine_dtype and trainer_dtype and engine_dtype != trainer_dtype:
        faults.append(("numerics", f"the engine computes in {engine_dtype} (as vLLM resolved "
                                   f"it), the trainer in {trainer_dtype}"))
    head_engine = s.get("head_dtype")
    head_trainer = "float32" if s.get("trainer_fp32_lm_head") else s.get("trainer_dtype")
    if head_engine and head_trainer and head_engine != head_trainer:
        faults.append(("numerics", f"the engine's lm_head runs in {head_engine} (as vLLM "
                                   f"resolved it), the trainer's in {head_trainer}"))
    return faults


def _ratio(engine: float, trainer: float) -> float:
    if engine <= EXACT:
        return 0.0
    return engine / max(trainer, EXACT)


@dataclass
class Verdict:
    passed: bool
    sentence: str  # why it passed or failed, in one sentence
    lines: list[str]  # the sentence first, then supporting observations
    culprit: str | None = None  # the layer named on a failure

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def judge(results: list[RungResult], floor: dict, dtype: str, tol: float | None = None) -> Verdict:
    """PASS/FAIL for one sampling's rungs (in ladder order), with the reasons."""
    last = results[-1]
    states = [consistency(r) for r in results]
    faults = settings_faults(last)
    if last.name == "bitwise":  # equal or nothing: no tolerance, no float64 rule
        bitwise = bitwise_consistency(last)
        measured_ok, rule = bitwise.ok, bitwise.why
    elif tol is not None:
        measured_ok = last.metrics["mismatch/max_abs_diff"] <= tol and states[-1].ok
        rule = f"max |Δ| {last.metrics['mismatch/max_abs_diff']:.3g} vs --tol {tol:g}"
    elif last.engine_error is None:
        bound = FALLBACK_TOL[dtype]
        measured_ok = last.metrics["mismatch/max_abs_diff"] <= bound and states[-1].ok
        rule = (f"no float64 evaluation; max |Δ| {last.metrics['mismatch/max_abs_diff']:.3g} vs "
                f"the {dtype} bound {bound:g}")
    else:
        measured_ok = states[-1].ok
        rule = states[-1].why
    passed = measured_ok and not faults
    culprit = None
    if passed:
        sentence = (f"PASS: at the last rung '{last.name}' the engine's logprobs are as close to "
                    f"exact arithmetic as the trainer's own ({rule})."
                    if tol is None and last.engine_error is not None and last.name != "bitwise"
                    else
                    f"PASS: at the last rung '{last.name}', {rule}.")
    elif faults:
        culprit = faults[0][0]
        measured = (f"measured: {rule}" if last.name == "bitwise" else
                    f"measured: {states[-1].why}" if states[-1].ok else
                    f"and it shows: {states[-1].why}")
        sentence = (f"FAIL at the {culprit} layer: {'; '.join(why for _, why in faults)} "
                    f"({measured}).")
    elif states[-1].ok:  # consistent, but beyond the absolute bound the user asked for
        sentence = f"FAIL: at the last rung '{last.name}', {rule}."
    elif _routes_differ(last):
        culprit = "routing"
        sentence = (f"FAIL at the routing layer: "
                    f"{last.metrics['mismatch/route_disagreement']:.2%} of (position, layer) "
                    f"routes differ between the engine and the trainer's own router "
                    f"({states[-1].why}); replay the engine's routes: "
                    f"trainer.moe_routing: replay.")
    else:
        index = _culprit(states)
        rung = results[index]
        culprit = rung.layer
        withheld = f"; withheld fix: {', '.join(rung.withheld)}" if rung.withheld else ""
        sentence = (f"FAIL at the {culprit} layer: from rung '{rung.name}' on, "
                    f"{states[index].why}{withheld}.")
    lines = [sentence] + _observations(results, floor)
    return Verdict(passed, sentence, lines, culprit)


def _routes_differ(r: RungResult) -> bool:
    """An MoE rung where the trainer routed by its own router and some routes differed."""
    return (r.settings.get("trainer_moe_routing") == "recompute"
            and r.metrics.get("mismatch/route_disagreement", 0.0) > 0)


def _culprit(states: list[Consistency]) -> int:
    """The first rung from which every rung is inconsistent; never the baseline itself (when no
    rung was ever consistent, the first fix should have made it so)."""
    start = len(states) - 1
    while start > 0 and not states[start - 1].ok:
        start -= 1
    return min(max(start, 1), len(states) - 1)


def _observations(results: list[RungResult], floor: dict) -> list[str]:
    """Which fix moved the mismatch, and by how much (supporting lines of the verdict)."""
    key = "mismatch/mean_abs_diff"
    lines = []
    fixes = {f.name: f for f in FIXES + [ROUTING]}
    floor_mean = floor.get(key, 0.0)
    for prev, cur in zip(results, results[1:]):
        before, after = prev.metrics[key], cur.metrics[key]
        fix = fixes.get(cur.name)
        if fix is None or cur.name in cur.withheld:
            continue
        if before - after > 10 * max(floor_mean, 1e-9) and before > 2 * after:
            lines.append(f"'{cur.name}' ({fix.what}; {cur.layer} layer) took mean |Δ| from "
                         f"{before:.3g} to {after:.3g}; clip rate@0.2 "
                         f"{prev.metrics['mismatch/clip_frac@0.2']:.3g} → "
                         f"{cur.metrics['mismatch/clip_frac@0.2']:.3g}.")
            if cur.name == "processed-logprobs":
                lines.append(f"  By default vLLM V1 reports logprobs of the raw model "
                             f"distribution while it samples from the processed one; the mean "
                             f"signed Δ was {prev.metrics['mismatch/mean_diff']:+.3g}.")
        elif after > 2 * before and after - before > 10 * max(floor_mean, 1e-9):
            lines.append(f"'{cur.name}' made the mismatch worse (mean |Δ| {before:.3g} → "
                         f"{after:.3g}): look at the {cur.layer} layer.")
    for r in results:
        if "routing/recompute_mean_abs_diff" in r.metrics:
            m = r.metrics
            lines.append(f"On the same tokens of '{r.name}': mean |Δ| "
                         f"{m['routing/recompute_mean_abs_diff']:.3g} with the trainer's own "
                         f"routing, {m['mismatch/mean_abs_diff']:.3g} replaying the engine's; "
                         f"KL k3 {m['routing/recompute_kl_k3']:.3g} → {m['mismatch/kl_k3']:.3g}.")
    routed = [r for r in results if "mismatch/route_disagreement" in r.metrics]
    if routed:
        lines.append("Expert routes that differ between engine and trainer's own router, per "
                     "rung: " + ", ".join(f"{r.name} {r.metrics['mismatch/route_disagreement']:.2%}"
                                          for r in routed) + ".")
    nucleus = [r.metrics.get("mismatch/nucleus_boundary_frac") for r in results]
    if any(nucleus):
        lines.append(f"Sampled tokens outside the trainer's own top-k/top-p set (kept by the "
                     f"nucleus rule): up to {max(n for n in nucleus if n is not None):.2%} of "
                     f"tokens per rung.")
    if floor:
        lines.append(f"The trainer against itself (batched vs one at a time): mean |Δ| "
                     f"{floor.get(key, float('nan')):.3g}, max |Δ| "
                     f"{floor.get('mismatch/max_abs_diff', float('nan')):.3g}.")
    return lines
