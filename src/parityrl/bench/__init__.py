"""`parityrl bench`: the speed of every stage of the data path, each as a ratio to its anchor.

    engine → rollouts      rollout.py      ours vs raw `vllm.LLM.generate` (tokens/s)
    weights → engine       weight_sync.py  in-place update vs memcpy of the same bytes, vs restart
    trainer logprobs       logprob_pass.py token_logprobs vs plain forward + log_softmax
    the whole loop         pipeline.py     mode async vs mode sync (samples/s, engine idle)
    diagnosis              doctor.py       `parityrl doctor` end to end
    bitwise mode           bitwise.py      trainer step with the engine's kernels vs default
    LoRA                   lora_sync.py    adapter update and trainer step vs full weights

Every figure is the median of several repetitions with its spread (stats.py); runner.py runs the
stages in one process on one machine and report.py writes results.json and results.md.
"""
