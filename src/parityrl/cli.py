"""The `parityrl` command line. Each command is a thin entry point; heavy imports happen inside.

    parityrl make-model runs/tiny                 # a tiny local HF model folder
    parityrl doctor --model runs/tiny             # layered engine/trainer logprob diagnosis
    parityrl train configs/reference.yaml         # pipeline RL
    parityrl compare runs/ref runs/cand --gate    # does a candidate run track the reference?
    parityrl export runs/ref out/model            # a checkpoint as a Hugging Face model folder
    parityrl demo                                 # the whole story on a laptop
    parityrl bench                                # speed of every stage against its anchor
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from parityrl.core.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pipeline RL on vLLM V1 whose rollout logprobs match the trainer's.")


def _quiet_libraries() -> None:
    # vLLM logs every engine start at INFO; the engine process inherits this environment.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The engine processes inherit this: vLLM's CPU build emits deprecation warnings of torch APIs.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


@app.command("make-model")
def make_model_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write the model to."),
    from_gguf: Optional[Path] = typer.Option(
        None, "--from-gguf", help="Dequantize this GGUF file (weights, tokenizer, chat template) "
                                  "into an HF folder instead of building a tiny random model."),
    arch: str = typer.Option("qwen2", help="Tiny model: qwen2, llama, or a mixture of experts: "
                                           "qwen3_moe, qwen2_moe (with a shared expert)."),
    tie_embeddings: bool = typer.Option(False, "--tie-embeddings", help="Share embedding and lm_head."),
    layers: Optional[int] = typer.Option(
        None, min=1, help="Tiny model: decoder layers (default 2). With --from-gguf: keep only "
                          "the first N layers (a truncated copy; default all)."),
    hidden: int = typer.Option(64, min=8),
    heads: int = typer.Option(2, min=1),
    kv_heads: int = typer.Option(1, min=1),
    seed: int = typer.Option(0),
    experts: int = typer.Option(8, min=1, help="MoE: experts per layer."),
    experts_per_token: int = typer.Option(2, min=1, help="MoE: experts a token is routed "
                                                         "to (top-k)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder."),
):
    """Write a model folder: a tiny random model (config, safetensors, character tokenizer), or
    a real model converted from a GGUF file."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    from parityrl.models.tiny import ARCHS

    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    _quiet_libraries()
    if from_gguf is not None:
        from parityrl.models.gguf import convert_gguf

        path = convert_gguf(from_gguf, out_dir, layers=layers)
        typer.echo(f"wrote {from_gguf.name} (dequantized{f', first {layers} layers' if layers else ''}) "
                   f"to {path}")
        return
    from parityrl.models.tiny import make_model

    path = make_model(out_dir, arch=arch, tie_embeddings=tie_embeddings, layers=layers or 2,
                      hidden=hidden, heads=heads, kv_heads=kv_heads, seed=seed, experts=experts,
                      experts_per_token=experts_per_token)
    typer.echo(f"wrote {arch} model to {path}")


def _read_prompts(path: Path) -> list:
    """Doctor prompts: a text file (one prompt a line) or JSONL rows with "messages" (an
    OpenAI-style list) or "prompt" (and an optional "system")."""
    from parityrl.tasks.prompts import as_messages

    if not path.exists():
        raise UserError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix != ".jsonl":
        prompts: list = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if isinstance(row, dict) and _is_messages(row.get("messages")):
                prompts.append(row["messages"])
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
                system = row.get("system")
                prompts.append(as_messages(row["prompt"], system) if system else row["prompt"])
            else:
                raise UserError(f'{path}:{lineno}: expected an object with "messages" (a list '
                                f'of {{"role", "content"}}) or "prompt" (a string)')
    if not prompts:
        raise UserError(f"prompts file is empty: {path}")
    return prompts


def _is_messages(value) -> bool:
    return (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value))


def _lora_line(last) -> str:
    """What the doctor's adapter was and did, at the last rung."""
    lora, engine = last.settings["trainer_lora"], last.settings.get("lora") or {}
    effect = last.metrics.get("lora/adapter_effect_mean_abs", float("nan"))
    return (f"LoRA: a random rank-{lora['rank']} adapter (alpha {lora['alpha']:g}) on "
            f"{', '.join(lora['targets'])}; it moves the trainer's logprobs by mean |Δ| "
            f"{effect:.3g} from the base model's; the engine holds it in {engine.get('lora_dtype')}"
            f" slots of rank {engine.get('max_lora_rank')} "
            f"(weight sync check: {last.sync_check or 'not pushed at this rung'}).")


@app.command()
def doctor(
    model: str = typer.Option(..., help="Hugging Face model folder, or builtin:<name> "
                                        "(tiny, arithmetic-warm, smollm2-135m-instruct, ...)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (both sides)."),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 disables top-k."),
    prompts: Optional[Path] = typer.Option(
        None, help='Text file (one prompt a line) or JSONL rows with "messages" or "prompt" '
                   '(+ "system"). Default: built-in.'),
    chat_template: Optional[bool] = typer.Option(
        None, "--chat-template/--no-chat-template",
        help="Render prompts with the tokenizer's chat template. Default: when it has one."),
    num_samples: int = typer.Option(4, min=1, help="Samples per prompt."),
    max_tokens: int = typer.Option(32, min=1),
    seed: int = typer.Option(0),
    tol: Optional[float] = typer.Option(
        None, help="An absolute bound on the last rung's max |Δ| instead of the float64 rule "
                   "(the engine as close to exact arithmetic as the trainer)."),
    quick: bool = typer.Option(False, "--quick", help="Only the last rung (the settings to use, "
                                                      "weights pushed): one engine start."),
    withhold: list[str] = typer.Option(
        [], "--withhold", help="Leave a fix out to see what it is worth (repeatable): "
                               "processed-logprobs, explicit-runtime, weight-sync, fp32-lm-head, "
                               "prefix-cache-reset."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
    report: Optional[Path] = typer.Option(None, help="Write report.md and PNG plots here."),
    multi_turn: bool = typer.Option(
        False, "--multi-turn", help="Also run two-turn episodes (a tool observation between "
                                    "the turns) on the last rung's settings: per-turn parity and "
                                    "the chat-template check; with --bitwise, three-turn "
                                    "episodes after the bitwise rung too, every token equal. "
                                    "Needs a chat template."),
    bitwise: bool = typer.Option(
        False, "--bitwise", help="Add the bitwise rung: the trainer scores with the engine's own "
                                 "kernels (parity.mode=bitwise; float32, CPU engine); it passes "
                                 "only if every token's logprob is equal."),
    sampler_draws: int = typer.Option(
        0, "--sampler-draws", min=0,
        help="Also test the sampler on the last rung's engine: this many one-token draws a "
             "prompt, G-tested against the engine's reported probabilities and the trainer's "
             "distribution (0 = off; 2000 is a good start)."),
    lora: Optional[int] = typer.Option(
        None, "--lora", min=1, metavar="RANK",
        help="Measure with a random non-zero LoRA adapter of this rank on every linear of the "
             "decoder, pushed into the engine as a training run pushes it; the weight-sync rung "
             "moves the adapter."),
    compare_dtypes: bool = typer.Option(
        False, "--compare-dtypes",
        help="Instead of the ladder: its last rung in float32, bfloat16 and float16 (both sides, "
             "one engine each), as a table of each side's error against float64, the mismatch, "
             "KL and the share of ratios outside [0.8, 1.25]."),
    weight_transport: str = typer.Option(
        "shm_file", "--weight-transport",
        help="How the rungs push weights: shm_file (shared memory) or gloo (vLLM's "
             "weight-transfer API, as engine.weight_transport=gloo in a run)."),
):
    """Diagnose engine/trainer logprob parity, one fix per rung; exit 0 = parity, 1 = not."""
    from parityrl.models.builtin import resolve_model
    from parityrl.models.load import TORCH_DTYPES, check_model_folder
    from parityrl.core.sampling import make_sampling

    if dtype not in TORCH_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")
    if compare_dtypes:
        clash = [name for name, on in (("--bitwise", bitwise), ("--multi-turn", multi_turn),
                                       ("--lora", lora), ("--sampler-draws", sampler_draws),
                                       ("--dtype", dtype != "float32")) if on]
        if clash:
            raise UserError(f"--compare-dtypes runs the last rung in each dtype; leave out "
                            f"{', '.join(clash)}")
    sampling = make_sampling(temperature=temperature, top_p=top_p, top_k=top_k,
                             max_tokens=max_tokens)
    prompt_list = _read_prompts(prompts) if prompts else None
    if tol is not None and tol < 0:
        raise UserError(f"--tol must be >= 0, got {tol}")
    if bitwise and dtype != "float32":
        raise UserError(f"--bitwise is audited in float32 only, not {dtype}")
    if lora and weight_transport != "shm_file":
        raise UserError("--lora pushes adapters as PEFT folders on this host: use "
                        "--weight-transport shm_file")
    if weight_transport not in ("shm_file", "gloo"):
        raise UserError(f"unknown --weight-transport {weight_transport!r}; choose shm_file or gloo")
    _quiet_libraries()
    folder = check_model_folder(resolve_model(model, say=typer.echo))
    from parityrl.hardware import bfloat16_warning

    warning = bfloat16_warning("bfloat16" if compare_dtypes else dtype)
    if warning:
        typer.echo(warning, err=True)

    from rich.console import Console

    from parityrl.doctor.ladder import DoctorConfig, build_ladder, run_ladder_sync
    from parityrl.doctor.report import (advice, judge_all, print_table, to_json, write_json,
                                        write_report)

    console = Console(width=None if sys.stdout.isatty() else 160)
    cfg = DoctorConfig(model=str(folder), dtype=dtype, samplings=[sampling],
                       num_samples=num_samples, seed=seed, tol=tol, chat_template=chat_template,
                       withhold=frozenset(withhold), weight_transport=weight_transport,
                       lora_rank=lora,
                       **({"prompts": prompt_list} if prompt_list else {}))
    if compare_dtypes:
        _doctor_precision_table(cfg, console, json_out, report)
    from parityrl.models.load import has_experts

    rungs = build_ladder(cfg.withhold, bitwise, moe=has_experts(folder))
    if quick:  # the settings to use (and the bitwise rung after them)
        rungs = rungs[-2:] if bitwise else rungs[-1:]
    turns = []  # the multi-turn check's results, after the last rung
    if multi_turn:
        from parityrl.models.tokenizer import load_tokenizer
        from parityrl.tasks.prompts import has_chat_template

        if chat_template is False or not has_chat_template(load_tokenizer(str(folder))):
            raise UserError("--multi-turn renders observations with the chat template, and this "
                            "model's tokenizer has none (or --no-chat-template was given)")
    with console.status(f"rung 1/{len(rungs)}: {rungs[0].name} (starting vLLM engine)") as status:
        done = []

        def on_rung(result):
            done.append(result)
            m = result.metrics
            console.print(f"  [green]✓[/green] {result.name}: mean |Δ| "
                          f"{m['mismatch/mean_abs_diff']:.2e}, max |Δ| "
                          f"{m['mismatch/max_abs_diff']:.2e}", highlight=False)
            if len(done) < len(rungs):
                status.update(f"rung {len(done) + 1}/{len(rungs)}: {rungs[len(done)].name}")
            if multi_turn and result.name == rungs[-1 - bitwise].name:
                status.update("multi-turn check: two-turn episodes on this rung's engine")
            elif multi_turn and result.name == "bitwise":
                status.update("multi-turn check: three-turn episodes scored with the kernels")
            elif sampler_draws and result.name == rungs[-1 - bitwise].name:
                status.update(f"sampler check: {sampler_draws} one-token draws a prompt")

        samplers = []  # the sampler check's results (one list per sampling)
        results, floor = run_ladder_sync(cfg, on_rung, rungs,
                                         turns.append if multi_turn else None,
                                         samplers.append if sampler_draws else None,
                                         sampler_draws)
    print_table(results, floor, console)
    passed, verdicts = judge_all(results, floor, dtype, tol)
    for v in verdicts:
        console.print(v.text, highlight=False)
    if lora:
        console.print(_lora_line(results[-1]), highlight=False)
    if multi_turn:
        for check in turns:
            console.print("\n".join(check.lines()), highlight=False)
        passed = passed and all(check.passed for check in turns)
    from parityrl.doctor import sampler as sampler_check

    for checked in samplers:
        console.print("\n".join(sampler_check.verdict_lines(checked)), highlight=False)
        passed = passed and all(r.passed for r in checked)
    console.print(advice(), highlight=False)
    header = {"model": model, "dtype": dtype, "temperature": temperature, "top_p": top_p,
              "top_k": top_k, "chat_template": results[0].settings["chat_template"],
              "samples": f"{len(cfg.prompts)}×{num_samples}", "max_tokens": max_tokens,
              "rule": f"--tol {tol:g}" if tol is not None else "float64 reference"}
    if json_out:
        extra = {"config": header}
        if multi_turn:
            extra["multi_turn"] = [{"passed": c.passed, "why": c.consistency.why,
                                    "metrics": c.result.metrics, "episodes": c.episodes,
                                    "template_mismatches": c.unfaithful} for c in turns]
        if samplers:
            extra["sampler"] = [sampler_check.to_json(checked) for checked in samplers]
        write_json(json_out, to_json(results, floor, verdicts, passed, extra))
    if report:
        path = write_report(results, floor, verdicts, passed, report, header)
        console.print(f"report: {path}")
    raise typer.Exit(0 if passed else 1)


def _doctor_precision_table(cfg, console, json_out: Optional[Path],
                            report: Optional[Path]) -> None:
    """`doctor --compare-dtypes`: the table, then exit 0 when every dtype passed, else 1."""
    import asyncio

    from parityrl.doctor import precision
    from parityrl.doctor.report import clean, write_json

    rows = []
    with console.status(f"{precision.DTYPES[0]}: the last rung (starting vLLM engine)") as status:
        def on_row(row):
            rows.append(row)
            m = row.result.metrics
            console.print(f"  [green]✓[/green] {row.dtype}: mean |Δ| "
                          f"{m['mismatch/mean_abs_diff']:.2e}, max |Δ| "
                          f"{m['mismatch/max_abs_diff']:.2e}", highlight=False)
            if len(rows) < len(precision.DTYPES):
                status.update(f"{precision.DTYPES[len(rows)]}: the last rung (starting vLLM "
                              "engine)")

        asyncio.run(precision.compare_dtypes(cfg, on_row=on_row))
    lines = precision.table_lines(rows) + ["", precision.summary_line(rows)]
    lines += [f"{row.dtype}: {row.verdict}" for row in rows]
    console.print("\n".join(lines), highlight=False, markup=False)
    if json_out:
        write_json(json_out, clean({"precision": [row.cells() for row in rows],
                                    "verdicts": {row.dtype: row.verdict for row in rows}}))
    if report:
        report.mkdir(parents=True, exist_ok=True)
        (report / "precision.md").write_text("\n".join(lines) + "\n")
        console.print(f"report: {report / 'precision.md'}")
    raise typer.Exit(0 if all(row.passed for row in rows) else 1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Optional[Path] = typer.Argument(None, help="YAML run config (omit with --resume)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<name>-<time>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue RUN_DIR from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a run that already is in --out."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config, check the "
                                                          "files it names, and exit."),
):
    """Pipeline RL. Extra arguments are dotted overrides: trainer.optim.lr=1e-4 max_steps=20.

    Values are read as YAML: quote one that YAML would read as something else, e.g.
    task.prompt_template='"{question} ="' (braces) or name='"1e3"' (a number)."""
    from parityrl.config import dump_config, load_config

    overrides = list(ctx.args)
    if resume is not None:
        if config is not None and "=" in str(config):
            overrides.insert(0, str(config))
        elif config is not None:
            raise UserError("give either a CONFIG or --resume RUN_DIR, not both")
        if not (resume / "config.yaml").exists():
            raise UserError(f"not a run directory (no config.yaml): {resume}")
        cfg = load_config(resume / "config.yaml", overrides)
    else:
        if config is None:
            raise UserError("missing CONFIG (a YAML file) or --resume RUN_DIR")
        cfg = load_config(config, overrides)
    from parityrl.models.builtin import PREFIX, resolve_model
    from parityrl.models.load import check_model_folder
    from parityrl.tasks.registry import build_task

    if dry_run:
        build_task(cfg.task)  # the task's files exist and parse
        if not cfg.model.startswith(PREFIX):
            check_model_folder(cfg.model)
        typer.echo(dump_config(cfg), nl=False)
        return
    if resume is not None:
        _nothing_left(resume, cfg.max_steps)
    _quiet_libraries()
    from parityrl.runlog import new_run_dir

    run_dir = resume or new_run_dir(cfg, out, overwrite)
    check_model_folder(resolve_model(cfg.model, say=typer.echo))
    from parityrl.pipeline import ParityAlarm, RunStopped, run_training
    from parityrl.progress import training_progress

    with training_progress(cfg.max_steps, description=cfg.name) as (on_step, say):
        try:
            result = run_training(cfg, run_dir, resume=resume is not None, on_step=on_step,
                                  on_message=say)
        except ParityAlarm:
            typer.echo(f"stopped by the parity alarm; metrics so far in {run_dir}", err=True)
            raise typer.Exit(1)
        except RunStopped as e:
            typer.echo(f"error: {e}; metrics so far in {run_dir}", err=True)
            raise typer.Exit(1)
    typer.echo(f"{result.steps} steps done; run directory: {run_dir}")


def _nothing_left(run_dir: Path, max_steps: int) -> None:
    """Resuming a finished run: say so before starting anything."""
    from parityrl.trainer.checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir)
    step = int(last.name.split("-")[-1]) if last is not None else 0
    if step >= max_steps:
        typer.echo(f"nothing to do: {run_dir} is at step {step} of max_steps={max_steps} "
                   f"(raise it: parityrl train --resume {run_dir} max_steps=N)")
        raise typer.Exit(0)


@app.command()
def export(
    source: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or one "
                                            "checkpoint folder (runs/x/checkpoints/step-N)."),
    out: Path = typer.Argument(..., help="The model folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder."),
    merge: bool = typer.Option(False, "--merge", help="A LoRA run: the base model with the "
                                                      "adapter merged (default: a PEFT adapter "
                                                      "folder)."),
):
    """Write a checkpoint as a Hugging Face model folder (vLLM, transformers, parityrl doctor);
    a LoRA run's as a PEFT adapter folder, or merged into the base with --merge."""
    _quiet_libraries()
    from parityrl.export import export_checkpoint

    path = export_checkpoint(source, out, overwrite, merge)
    typer.echo(f"wrote {path}")


@app.command()
def demo(out: Optional[Path] = typer.Option(None, help="Run directory (default runs/demo-<time>).")):
    """Tiny model → supervised warm start → pipeline RL on vLLM → held-out accuracy before/after."""
    _quiet_libraries()
    import time

    from parityrl.demo import run_demo

    out = out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_demo(out, console_print=typer.echo)
    before, after = summary["accuracy_before_rl"], summary["accuracy_after_rl"]
    typer.echo(f"held-out greedy accuracy: {before:.1%} after the warm start → {after:.1%} after "
               f"RL ({summary['improvement_points']:+.1f} points) in "
               f"{summary['seconds_total'] / 60:.1f} min")
    typer.echo(f"summary: {out / 'summary.json'}; plots: {out / 'rl' / 'plots'}")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="REF_RUN CAND_RUN [MORE_RUNS...]"),
    metrics: Optional[str] = typer.Option(None, help="Comma-separated metric names."),
    out: Optional[Path] = typer.Option(None, help="Write report.md, comparison.json and PNGs."),
    ref: list[Path] = typer.Option([], "--ref", help="Another seed of the reference (repeatable)."),
    smooth: int = typer.Option(5, min=1, help="Trailing moving-average window, in steps."),
    gate: bool = typer.Option(False, "--gate", help="Exit 1 if any compared metric diverges."),
):
    """Does each candidate run track the reference run? From which step, on which metric?"""
    if len(runs) < 2:
        raise UserError("give a reference run and at least one candidate run")
    from parityrl.compare import compare_runs, write_report

    wanted = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    result = compare_runs(runs[0], runs[1:], ref, wanted, window=smooth)
    typer.echo(result.verdict)
    for res in result.results:
        hits = ", ".join(f"{name}: step {step}" for name, step in res.diverged_at.items()
                         if step is not None)
        typer.echo(f"  {res.metric:<24} {hits or 'tracks'}")
    if out:
        typer.echo(f"report: {write_report(result, out)}")
    raise typer.Exit(1 if gate and result.diverged else 0)


@app.command()
def bench(
    out: Path = typer.Option(Path("bench/results.json"), help="JSON results; results.md beside it."),
    only: Optional[str] = typer.Option(None, help="Comma-separated stages: engine_start, rollout, "
                                                  "weight_sync, logprob_pass, pipeline, doctor, bitwise, "
                                                  "lora_sync; and peer (the side-by-side with "
                                                  "TRL, run only when named; needs the extra "
                                                  "`peer`)."),
    reps: int = typer.Option(5, help="Repetitions per timed figure (medians and spread)."),
):
    """Measure every stage of the data path as a ratio to its anchor (about 5 min on 2 cores)."""
    _quiet_libraries()
    from parityrl.bench.runner import run_bench

    stages = [s.strip() for s in only.split(",") if s.strip()] if only else None
    command = "parityrl bench" + "".join(f" {a}" for a in sys.argv[2:])
    run_bench(out, stages, reps, say=typer.echo, command=command)
    typer.echo(f"results: {out} and {out.with_suffix('.md')}")
    typer.echo(out.with_suffix(".md").read_text())


def main() -> None:
    try:
        # Without standalone mode click returns the code of a typer.Exit instead of raising it.
        code = app(standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:
        # Usage errors (unknown option, bad type) of typer's click → one line, exit 2.
        if hasattr(e, "format_message") and getattr(e, "exit_code", None) == 2:
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
