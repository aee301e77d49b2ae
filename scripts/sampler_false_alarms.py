"""How often the doctor's sampler check fails a correct setup: RUNS independent checks (other
seeds) on one engine with the parity settings; prints the failures and how uniform the tests'
p-values are (a calibrated test gives ~5 % below 0.05).

    .venv/bin/python scripts/sampler_false_alarms.py --model builtin:tiny --runs 20
    .venv/bin/python scripts/sampler_false_alarms.py \\
        --model builtin:smollm2-135m-instruct-4layers --dtype bfloat16 --runs 20
"""

from __future__ import annotations

import argparse
import asyncio
import time

from parityrl.doctor.ladder import DEFAULT_PROMPTS
from parityrl.doctor.sampler import ALPHA, check_sampler
from parityrl.engine.engine import RolloutEngine
from parityrl.engine.settings import EngineSettings
from parityrl.models.builtin import resolve_model
from parityrl.models.load import load_policy
from parityrl.models.tokenizer import load_tokenizer
from parityrl.core.sampling import SamplingConfig
from parityrl.tasks.prompts import encode_prompt, has_chat_template


async def main(args) -> None:
    folder = str(resolve_model(args.model, say=print))
    tokenizer = load_tokenizer(folder)
    chat = has_chat_template(tokenizer)
    prompts = [encode_prompt(tokenizer, p, chat) for p in DEFAULT_PROMPTS[:args.prompts]]
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=1)
    policy = load_policy(folder, args.dtype)
    engine = await RolloutEngine.start(EngineSettings(model=folder, dtype=args.dtype))
    failed, p_values, started = 0, [], time.perf_counter()
    try:
        for run in range(args.runs):
            results = await check_sampler(engine, policy, prompts, sampling, args.draws,
                                          seed=run * 10**6)
            failed += not all(r.passed for r in results)
            p_values += [p for r in results for p in (r.engine.p_value, r.trainer.p_value)]
            print(f"run {run}: {'PASS' if all(r.passed for r in results) else 'FAIL'}  min p "
                  f"{min(min(r.engine.p_value, r.trainer.p_value) for r in results):.3g}",
                  flush=True)
    finally:
        await engine.close()
    below = sum(p < 0.05 for p in p_values) / len(p_values)
    print(f"{args.model} {args.dtype} T={args.temperature} top_p={args.top_p}: {failed} of "
          f"{args.runs} correct runs failed (false-alarm rate stated: {ALPHA:g}); "
          f"{len(p_values)} tests, {below:.1%} of p-values below 0.05; "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    asyncio.run(main(parser.parse_args()))
