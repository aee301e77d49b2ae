"""A live progress line for training: step, reward, clip rate, mismatch and lag (and the held-out
accuracy and pass@k on the steps that evaluate)."""

from __future__ import annotations

from contextlib import contextmanager


def _fmt(metrics: dict, key: str, spec: str) -> str:
    value = metrics.get(key)
    return "–" if value is None or value != value else format(value, spec)


def _stats(metrics: dict) -> str:
    stats = (f"reward {_fmt(metrics, 'rl/reward_mean', '.3f')}  "
             f"clip {_fmt(metrics, 'rl/clip_frac', '.3f')}  "
             f"mismatch {_fmt(metrics, 'mismatch/max_abs_diff', '.1e')}  "
             f"lag {_fmt(metrics, 'lag/mean', '.2f')}")
    if "eval/accuracy" in metrics:
        stats += f"  eval {metrics['eval/accuracy']:.3f}"
    return stats + "".join(f"  {key.split('/', 1)[1]} {metrics[key]:.3f}"
                           for key in pass_at_k_keys(metrics))


def pass_at_k_keys(keys) -> list[str]:
    """The eval/pass@k metric names among `keys`, in order of k (pass@16 after pass@4, not
    before it as in the names' text order)."""
    return sorted((key for key in keys if key.startswith("eval/pass@")),
                  key=lambda key: int(key.rsplit("@", 1)[1]))


@contextmanager
def training_progress(total: int, start: int = 0, description: str = "train"):
    """Yields (on_step(step, metrics), say) for the pipeline: a live progress bar on a terminal,
    one plain line per step otherwise (log files, CI), never cut to a width."""
    import sys
    import time

    if not sys.stdout.isatty():
        began = time.monotonic()

        def on_line(step: int, metrics: dict) -> None:
            print(f"{description} step {step}/{total} [{time.monotonic() - began:.0f} s] "
                  f"{_stats(metrics)}", flush=True)

        yield on_line, lambda message: print(message, flush=True)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[stats]}")) as progress:
        task = progress.add_task(description, total=total, completed=start, stats="")

        def on_step(step: int, metrics: dict) -> None:
            progress.update(task, completed=step, stats=_stats(metrics))

        yield on_step, progress.console.print
