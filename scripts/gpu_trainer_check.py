"""Trainer-side checks on a CUDA GPU (no vLLM needed): run where a GPU is lent.

    python scripts/gpu_trainer_check.py OUT.json

On a tiny local model: token_logprobs in bfloat16 on CUDA (top-p 0.9, top-k 20, the nucleus rule)
against a float64 CPU evaluation of the same weights, and one RL trainer step in bfloat16 with
float32 master weights on CUDA. Everything must be finite; prints and writes what it measured.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main(out: Path) -> None:
    from parityrl.config import build_config
    from parityrl.models.load import load_policy
    from parityrl.models.tiny import make_model
    from parityrl.core.rollout import Rollout
    from parityrl.core.sampling import SamplingConfig
    from parityrl.trainer.batch import rollout_logprobs
    from parityrl.trainer.trainer import Trainer

    folder = make_model(Path("/tmp/gpu-check-model"), layers=4, hidden=256, heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(32):
        prompt = torch.randint(4, 90, (12,), generator=gen).tolist()
        completion = torch.randint(4, 90, (24,), generator=gen).tolist()
        r = Rollout(prompt, completion, [-1.0] * 24, [0] * 24, "length", group_id=i // 4)
        r.reward = float(i % 2)
        rollouts.append(r)
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    exact_model = load_policy(folder, "float32").double()
    for name, sampling in {"top_p_0.9": SamplingConfig(temperature=0.7, top_p=0.9),
                           "top_k_20": SamplingConfig(temperature=0.7, top_k=20)}.items():
        exact = rollout_logprobs(exact_model, rollouts, sampling, pad_id=0)
        for dtype in ("bfloat16", "float32"):
            model = load_policy(folder, dtype, device="cuda")
            start = time.perf_counter()
            got = rollout_logprobs(model, rollouts, sampling, pad_id=0)
            seconds = time.perf_counter() - start
            lp = torch.cat([g.logprobs for g in got]).double()
            ref = torch.cat([e.logprobs for e in exact])
            outside = torch.cat([g.outside_nucleus for g in got])
            err = (lp - ref).abs()
            report[f"{name}/{dtype}"] = {
                "finite": bool(torch.isfinite(lp).all()), "tokens": lp.numel(),
                "error_vs_float64_mean": err.mean().item(), "error_max": err.max().item(),
                "outside_own_nucleus_frac": outside.double().mean().item(),
                "seconds": seconds}
    cfg = build_config({"model": str(folder), "dtype": "bfloat16",
                        "sampling": {"temperature": 0.7, "top_p": 0.9}})
    trainer = Trainer(cfg, load_policy(folder, "bfloat16", device="cuda"), pad_id=0)
    groups = [rollouts[i:i + 4] for i in range(0, 32, 4)]
    metrics = trainer.apply(trainer.accumulate(groups))
    report["train_step_bfloat16_cuda"] = {
        "all_finite": all(v == v and abs(v) != float("inf") for v in metrics.values()),
        "master_weights_float32": trainer.master is not None
        and all(m.dtype == torch.float32 and m.device.type == "cuda" for m in trainer.master),
        "grad_norm": metrics.get("rl/grad_norm"), "skipped": metrics["rl/skipped_nonfinite"]}
    print(json.dumps(report, indent=2))
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
