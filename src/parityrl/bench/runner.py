"""Run the bench stages in order in one process; results are written after every stage."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from parityrl.bench import (
    bitwise,
    doctor,
    engine_start,
    logprob_pass,
    lora_sync,
    peer,
    pipeline,
    report,
    rollout,
    soak,
    weight_sync,
)
from parityrl.core.errors import UserError

STAGES = ("engine_start", "rollout", "weight_sync", "logprob_pass", "pipeline", "doctor", "bitwise",
          "lora_sync", "peer", "soak")
# Run only when named: peer needs the optional extra `peer` (TRL); soak takes ~25 minutes.
OPT_IN = ("peer", "soak")


def run_bench(out: Path, only: list[str] | None = None, reps: int = 5, say=print,
              command: str = "parityrl bench") -> dict:
    chosen = only or [s for s in STAGES if s not in OPT_IN]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise UserError(f"unknown bench stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    if reps < 1:
        raise UserError(f"--reps must be >= 1, got {reps}")
    results: dict = {"command": command, "machine": report.machine(), "stages": {},
                     "seconds_total": 0.0}
    if only and out.exists():
        # `--only` refreshes the stages it names; the others keep their last measurement (each
        # stage records the command that measured it).
        previous = json.loads(out.read_text())
        results["stages"] = {k: v for k, v in previous.get("stages", {}).items()
                             if k not in chosen}
        for data in results["stages"].values():
            data.setdefault("bench_command", previous.get("command"))
            results.update({k: data[k] for k in report.HEADLINES if k in data})
    start = time.perf_counter()
    loop = asyncio.new_event_loop()
    try:
        for stage in STAGES:
            if stage not in chosen:
                continue
            stage_start = time.perf_counter()
            if stage == "engine_start":
                data = engine_start.run(engine_start.EngineStartBench(reps=reps), loop, say)
            elif stage == "rollout":
                data = rollout.run(rollout.RolloutBench(reps=reps), loop, say)
            elif stage == "weight_sync":
                data = weight_sync.run(weight_sync.WeightSyncBench(reps=reps), loop, say)
            elif stage == "logprob_pass":
                data = logprob_pass.run(logprob_pass.LogprobBench(reps=reps), say)
            elif stage == "pipeline":
                data = pipeline.run(pipeline.PipelineBench(), say)
            elif stage == "doctor":
                data = doctor.run(say=say)
            elif stage == "bitwise":
                data = bitwise.run(bitwise.BitwiseBench(reps=reps), say)
            elif stage == "peer":
                data = peer.run(out=out.parent / "peer", say=say)
            elif stage == "soak":
                data = soak.run(out=out.parent / "soak", say=say)
            else:
                data = lora_sync.run(lora_sync.LoRASyncBench(reps=reps), loop, say)
            data["stage_seconds"] = time.perf_counter() - stage_start
            data["bench_command"] = command
            results["stages"][stage] = data
            for key in report.HEADLINES:
                if key in data:
                    results[key] = data[key]
            results["seconds_total"] = time.perf_counter() - start
            report.write(results, out)
            failed = [a for a, r in data.get("arms", {}).items() if "error" in r]
            if failed:  # written above; the run still says so in its exit code
                raise UserError(f"bench stage {stage}: arm(s) {', '.join(failed)} failed (their "
                                f"logs: {out.parent / stage}/<arm>/log.txt)")
    finally:
        loop.close()
    return results
