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

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from parityrl.core.errors import UserError
from parityrl.doctor.config import DoctorConfig, parse_config

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
    reward_model: bool = typer.Option(False, "--reward-model", help="A one-label "
                                      "*ForSequenceClassification model (a reward model, score "
                                      "head random) instead of a causal LM."),
):
    """Write a model folder: a tiny random model (config, safetensors, character tokenizer), or
    a real model converted from a GGUF file."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    # imported when the command runs: --help stays instant
    from parityrl.models.tiny import ARCHS

    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    _quiet_libraries()
    if from_gguf is not None:
        # imported when the command runs: --help stays instant
        from parityrl.models.gguf import convert_gguf

        path = convert_gguf(from_gguf, out_dir, layers=layers)
        typer.echo(f"wrote {from_gguf.name} (dequantized{f', first {layers} layers' if layers else ''}) "
                   f"to {path}")
        return
    # imported when the command runs: --help stays instant
    from parityrl.models.tiny import make_model

    path = make_model(out_dir, arch=arch, tie_embeddings=tie_embeddings, layers=layers or 2,
                      hidden=hidden, heads=heads, kv_heads=kv_heads, seed=seed, experts=experts,
                      experts_per_token=experts_per_token,
                      head="sequence_classification" if reward_model else "causal_lm")
    typer.echo(f"wrote {arch} {'reward model' if reward_model else 'model'} to {path}")


def _doctor_option(name: str, *flags: str, **kwargs):
    """A `doctor` option: the DoctorConfig field of this name gives its default and its help."""
    info = DoctorConfig.model_fields[name]
    default = ... if info.is_required() else info.default
    return typer.Option(default, *flags, help=info.description, **kwargs)


class _DoctorProgress:
    """The doctor's progress on the console: a spinner that says what runs now, a ✓ line for
    each finished step; messages on stdout, warnings on stderr."""

    def __init__(self, console) -> None:
        self.console, self.spinner = console, None

    def say(self, text: str) -> None:
        typer.echo(text)

    def warn(self, text: str) -> None:
        typer.echo(text, err=True)

    def status(self, text: str) -> None:
        if self.spinner is None:
            self.spinner = self.console.status(text)
            self.spinner.start()
        else:
            self.spinner.update(text)

    def done(self, text: str) -> None:
        self.console.print(f"  [green]✓[/green] {text}", highlight=False)

    def stop(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None


@app.command()
def doctor(
    model: Optional[str] = _doctor_option("model"),
    dtype: str = _doctor_option("dtype"),
    temperature: float = _doctor_option("temperature"),
    top_p: float = _doctor_option("top_p", "--top-p"),
    top_k: int = _doctor_option("top_k", "--top-k"),
    prompts: Optional[Path] = _doctor_option("prompts"),
    chat_template: Optional[bool] = _doctor_option("chat_template",
                                                   "--chat-template/--no-chat-template"),
    num_samples: int = _doctor_option("num_samples", min=1),
    max_tokens: int = _doctor_option("max_tokens", min=1),
    seed: int = _doctor_option("seed"),
    tol: Optional[float] = _doctor_option("tol"),
    quick: bool = _doctor_option("quick", "--quick"),
    withhold: list[str] = _doctor_option("withhold", "--withhold"),
    json_out: Optional[Path] = _doctor_option("json_out", "--json"),
    report: Optional[Path] = _doctor_option("report"),
    multi_turn: bool = _doctor_option("multi_turn", "--multi-turn"),
    bitwise: bool = _doctor_option("bitwise", "--bitwise"),
    sampler_draws: int = _doctor_option("sampler_draws", "--sampler-draws", min=0),
    lora: Optional[int] = _doctor_option("lora", "--lora", min=1, metavar="RANK"),
    compare_dtypes: bool = _doctor_option("compare_dtypes", "--compare-dtypes"),
    weight_transport: str = _doctor_option("weight_transport", "--weight-transport"),
    reward_model: Optional[str] = _doctor_option("reward_model", "--reward-model",
                                                 metavar="PATH"),
    reward_texts: Optional[Path] = _doctor_option("reward_texts", "--reward-texts"),
    reward_activation: str = _doctor_option("reward_activation", "--reward-activation"),
    reward_engine_activation: str = _doctor_option("reward_engine_activation",
                                                   "--reward-engine-activation"),
):
    """Diagnose engine/trainer logprob parity, one fix per rung; exit 0 = parity, 1 = not."""
    config = parse_config(locals())  # every option is the DoctorConfig field of its name
    _quiet_libraries()
    from rich.console import Console

    from parityrl.doctor import run as run_doctor  # torch and vLLM: not for --help

    console = Console(width=None if sys.stdout.isatty() else 160)
    progress = _DoctorProgress(console)
    try:
        result = run_doctor(config, progress)
    finally:
        progress.stop()
    result.print(console)
    if config.json_out:
        result.write_json(config.json_out)
    if config.report:
        console.print(f"report: {result.write_report(config.report)}")
    raise typer.Exit(result.exit_code)


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
    plan: bool = typer.Option(False, "--plan", help="Print each process's predicted peak memory "
                                                    "(the trainer built, no engine started) "
                                                    "and exit; 2 when it would not fit."),
):
    """Pipeline RL. Extra arguments are dotted overrides: trainer.optim.lr=1e-4 max_steps=20.

    Values are read as YAML: quote one that YAML would read as something else, e.g.
    task.prompt_template='"{question} ="' (braces) or name='"1e3"' (a number)."""
    # imported when the command runs: --help stays instant
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
    # imported when the command runs: --help stays instant
    from parityrl.models.builtin import PREFIX, resolve_model
    from parityrl.models.load import check_model_folder
    from parityrl.tasks.registry import build_task

    if dry_run:
        build_task(cfg.task)  # the task's files exist and parse
        if not cfg.model.startswith(PREFIX):
            check_model_folder(cfg.model)
        typer.echo(dump_config(cfg), nl=False)
        return
    if plan:
        _quiet_libraries()
        # imported when the command runs: --help stays instant
        from parityrl.memory_plan import refuse_if_too_big
        from parityrl.pipeline import plan_run

        memory = plan_run(cfg, say=typer.echo)
        typer.echo(memory.table())
        refuse_if_too_big(memory, cfg)
        return
    if resume is not None:
        _nothing_left(resume, cfg.max_steps)
    _quiet_libraries()
    # imported when the command runs: --help stays instant
    from parityrl.runlog import hold_run_dir, new_run_dir

    run_dir = resume or new_run_dir(cfg, out, overwrite)
    hold_run_dir(run_dir)  # refused while another live process writes it
    check_model_folder(resolve_model(cfg.model, say=typer.echo))
    # imported when the command runs: --help stays instant
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
    # imported when the command runs: --help stays instant
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
    # imported when the command runs: --help stays instant
    from parityrl.export import export_checkpoint

    path = export_checkpoint(source, out, overwrite, merge)
    typer.echo(f"wrote {path}")


@app.command()
def demo(out: Optional[Path] = typer.Option(None, help="Run directory (default runs/demo-<time>).")):
    """Tiny model → supervised warm start → pipeline RL on vLLM → held-out accuracy before/after."""
    _quiet_libraries()
    import time

    # imported when the command runs: --help stays instant
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
    # imported when the command runs: --help stays instant
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
                                                  "lora_sync; and, run only when named, peer "
                                                  "(the side-by-side with TRL; needs the extra "
                                                  "`peer`) and soak (a 3,000-step run with "
                                                  "faults, ~15 min; docs/long-runs.md)."),
    reps: int = typer.Option(5, help="Repetitions per timed figure (medians and spread)."),
):
    """Measure every stage of the data path as a ratio to its anchor (about 5 min on 2 cores)."""
    _quiet_libraries()
    # imported when the command runs: --help stays instant
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
