"""The run directory and what goes in it.

    runs/<name>-<time>/
        config.yaml            the resolved RunConfig
        engine_settings.json   what vLLM resolved (not what we asked for)
        versions.json          python, torch, vllm, transformers, platform
        metrics.jsonl          one JSON object per optimizer step
        problems.jsonl         per step, the problem indices trained on, rejected, dropped as stale
        samples.jsonl          a few rollouts (prompt, completion, reward) every samples_every steps
        errors.log             the first traceback of each kind of failure (when there was one),
                               and every wait past run.report_waits_after_s
        .lock                  held by the live process writing the run (`hold_run_dir`)
        tb/                    TensorBoard events
        checkpoints/           see trainer/checkpoint.py
        plots/                 PNGs made from metrics.jsonl
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import parityrl
from parityrl.config import RunConfig, dump_config
from parityrl.core.errors import UserError

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")


def holds_a_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_MARKERS)


def new_run_dir(cfg: RunConfig, out: Path | None, overwrite: bool = False) -> Path:
    """The directory of a new run, created and known to be writable before any work starts.

    An existing run is never written over silently: that takes `overwrite` (which removes it)."""
    import shutil

    path = out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a directory")
    if path.is_dir() and holds_a_run(path):
        if not overwrite:
            raise UserError(f"{path} already holds a run; continue it with --resume {path}, or "
                            f"replace it with --overwrite")
        hold_run_dir(path)  # never remove a run that is still being written
        shutil.rmtree(path)
        _held.pop(path.resolve()).close()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".parityrl-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the run directory {path}: {e.strerror or e}") from None
    return path


_held: dict[Path, object] = {}  # run directory → its open, locked .lock (kept for the process)


def hold_run_dir(path: Path) -> None:
    """Make this process the run directory's one writer, until it exits.

    An exclusive flock on `path/.lock`: the kernel drops it however the holder ends (a crash, a
    SIGKILL, the OOM killer), so the lock of a dead run is simply taken over. A directory a live
    process holds is refused, naming that process; a second `parityrl train --resume` (or
    `--overwrite`) would otherwise interleave its steps with the first run's."""
    import fcntl

    key = path.resolve()
    if key in _held:
        return
    try:
        lock = open(path / ".lock", "a+")  # noqa: SIM115 - held open for the process's life
    except OSError as e:
        raise UserError(f"cannot write the run directory {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{path} is being written by a live run ({holder}); stop it first, or "
                        f"give this run another directory") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    _held[key] = lock


def library_versions() -> dict:
    import torch
    import transformers

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:  # pragma: no cover - vllm is a hard requirement of training
        vllm_version = None
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "vllm": vllm_version, "parityrl": parityrl.__version__}


def write_run_files(run_dir: Path, cfg: RunConfig, engine_settings: dict,
                    reward_engines: dict | None = None) -> None:
    """The resolved config, what vLLM made of the engine settings (and of the reward engines'
    settings, with learned rewards), the library versions."""
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "engine_settings.json").write_text(json.dumps(engine_settings, indent=2) + "\n")
    if reward_engines is not None:
        (run_dir / "reward_engines.json").write_text(json.dumps(reward_engines, indent=2) + "\n")
    (run_dir / "versions.json").write_text(json.dumps(library_versions(), indent=2) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a half-written last line (a run being written) is skipped."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class JsonlLog:
    """One JSON object per step, appended; rows after `resume_step` are dropped at open (a resumed
    run does those steps again)."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = path
        if resume_step or self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")

    def write(self, step: int, row: dict) -> None:
        self._file.write(json.dumps({"step": step, **row}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsWriter:
    """Appends one JSON line per step to metrics.jsonl (and mirrors scalars to TensorBoard)."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._log = JsonlLog(self.path, resume_step)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """One row; a non-finite value is not written as a number but named in `nonfinite`."""
        finite = {k: v for k, v in metrics.items()
                  if not (isinstance(v, float) and not math.isfinite(v))}
        row = {"time": time.time(), **finite}
        bad = sorted(set(metrics) - set(finite))
        if bad:
            row["nonfinite"] = bad
        self._log.write(step, row)
        if self._tb is not None:
            for key, value in finite.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        self._log.close()
        if self._tb is not None:
            self._tb.close()


# The step metric that counts later failures of a kind (default: rollouts/rejected_<kind>).
COUNTERS = {"template_mismatch": "rollouts/template_mismatch",
            "no_signal_cap": "rl/groups_dropped_no_signal"}


class ErrorLog:
    """errors.log in the run directory: the first traceback of each kind of failure, once, and a
    one-line announcement of it on the console. Later failures of a kind are only counted (the
    step metrics carry the counts)."""

    def __init__(self, path: Path, announce) -> None:
        self.path = path
        self.announce = announce
        self.seen: set[str] = set()

    def note(self, line: str) -> None:
        """A line that is no failure, but that whoever reads the log later should see (a long
        wait)."""
        with self.path.open("a") as f:
            f.write(f"== note ({time.strftime('%Y-%m-%d %H:%M:%S')}): {line}\n")

    def record(self, kind: str, error: BaseException) -> None:
        if kind in self.seen:
            return
        self.seen.add(kind)
        import traceback

        cause = getattr(error, "cause", None) or error
        text = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
        with self.path.open("a") as f:
            f.write(f"== {kind} ({time.strftime('%Y-%m-%d %H:%M:%S')}): {error}\n{text}\n")
        if kind == "engine_restart":
            self.announce(f"engine restart: {type(error).__name__} (traceback in {self.path})")
            return
        counter = COUNTERS.get(kind, f"rollouts/rejected_{kind}")
        self.announce(f"{kind}: {error} (first of its kind; traceback in {self.path}, later ones "
                      f"counted as {counter})")
