"""Atomic checkpoints: model + optimizer + RNG + step + data position, in safetensors.

    runs/x/checkpoints/step-000050/
        model.safetensors       trainer weights in the model folder's layout (HF names and shapes,
                                per-expert tensors on MoE models; what the engine loads), or
                                with trainer.lora the adapter's tensors only (PEFT names)
        optimizer.safetensors   AdamW state tensors, flattened as state.<param index>.<key>
        master.safetensors      float32 master weights (bfloat16/float16 models only)
        state.json              step, data position, optimizer param groups, python/torch RNG

A checkpoint is written to a temporary folder and renamed into place, so a crash leaves either
the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from parityrl.core.errors import UserError
from parityrl.trainer.distributed import full_tensor, is_sharded, shard_like
from parityrl.trainer.layout import checkpoint_state_dict, to_model_layout
from parityrl.trainer.lora import adapter_state_dict, lora_rank
from parityrl.weights.shm_file import unique_tensors


@dataclass
class TrainingState:
    step: int
    data_position: int
    extra: dict
    master: dict[str, torch.Tensor] | None = None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """The optimizer's state tensors, whole: a sharded parameter's state is gathered from the
    ranks (a collective then: every rank calls this)."""
    state = optimizer.state_dict()
    tensors = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{pid}.{key}"] = full_tensor(t).contiguous().cpu()
    return tensors, state["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path, groups: list) -> None:
    """The saved (whole) state tensors; for a sharded parameter this rank's shard of each."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        param = params[int(pid)]
        if is_sharded(param) and value.shape == param.shape:  # not AdamW's scalar step
            value = shard_like(value, param)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: Path, model, optimizer, step: int, data_position: int,
                    keep: int, extra: dict | None = None,
                    master: dict[str, torch.Tensor] | None = None) -> Path:
    opt_tensors, groups = _optimizer_tensors(optimizer)
    weights = checkpoint_state_dict(model)
    return _write(run_dir, step, lambda path: write_weights(weights, path),
                  opt_tensors, groups, data_position, keep, extra, master)


def write_weights(weights: dict[str, torch.Tensor], path: str) -> None:
    """The model file: the checkpoint layout (`checkpoint_state_dict`, what a model folder and
    the engine hold; the same for any number of ranks), a tied tensor once."""
    save_file({n: t.contiguous() for n, t in unique_tensors(weights).items()}, path)


def read_weights(model, path: str) -> dict[str, torch.Tensor]:
    """The model file under `model`'s in-memory names (a tied tensor under one of them)."""
    return to_model_layout(model, load_file(path))


def _load_whole(model, path: str) -> None:
    saved = read_weights(model, path)
    missing, unexpected = model.load_state_dict(saved, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise UserError(f"{path} does not hold this model's weights (missing "
                        f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")


def _write(run_dir: Path, step: int, write_model, opt_tensors: dict, groups: list,
           data_position: int, keep: int, extra: dict | None,
           master: dict[str, torch.Tensor] | None) -> Path:
    """Write checkpoint STEP into a temporary folder and rename it into place."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_model(str(tmp / "model.safetensors"))
        _injected_fault(step)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        if master is not None:
            save_file({k: v.contiguous() for k, v in master.items()},
                      str(tmp / "master.safetensors"))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "data_position": data_position, "param_groups": groups,
            "python_rng": _jsonable(random.getstate()), "extra": extra or {},
        }, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the latest
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _injected_fault(step: int) -> None:
    """Tests only, half-way through writing checkpoint STEP (after the model, before the
    optimizer): PARITYRL_FAULT_CHECKPOINT_SLEEP="STEP:SECONDS" stalls there, so a test can kill
    the process; PARITYRL_FAULT_CHECKPOINT_ERROR="STEP" fails there as a full disk would."""
    import errno
    import os
    import time

    spec = os.environ.get("PARITYRL_FAULT_CHECKPOINT_SLEEP")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))
    if os.environ.get("PARITYRL_FAULT_CHECKPOINT_ERROR") == str(step):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")


def save_trainer(trainer, run_dir: Path, step: int, data_position: int, keep: int,
                 extra: dict | None = None) -> Path | None:
    """A checkpoint of `trainer` (a Trainer; every rank of a sharded one calls this, rank 0
    writes). The format does not depend on the number of ranks."""
    if trainer.sharded:
        return _save_sharded(trainer, run_dir, step, data_position, keep, extra)
    if trainer.lora is not None:  # the adapter only: the base is the model folder's, frozen
        opt_tensors, groups = _optimizer_tensors(trainer.optimizer)
        adapter = {n: t.contiguous() for n, t in trainer.weights().items()}
        return _write(run_dir, step, lambda path: save_file(adapter, path), opt_tensors, groups,
                      data_position, keep, {**(extra or {}), "lora": trainer.lora},
                      trainer.master_state())
    return save_checkpoint(run_dir, trainer.model, trainer.optimizer, step, data_position, keep,
                           extra, master=trainer.master_state())


def _save_sharded(trainer, run_dir: Path, step: int, data_position: int, keep: int,
                  extra: dict | None) -> Path | None:
    """Several ranks: every tensor gathered whole (collectives, the same order on every rank)
    and written by rank 0 in the one-rank format, so any number of ranks can resume it."""
    import torch.distributed as torch_dist

    weights = trainer.weights()
    opt_tensors, groups = _optimizer_tensors(trainer.optimizer)
    master = trainer.master_state()
    written = None
    try:
        if trainer.dist.is_main:
            written = _write(run_dir, step, lambda path: write_weights(weights, path),
                             opt_tensors, groups, data_position, keep, extra, master)
    finally:
        # Every rank returns once the checkpoint is complete (or rank 0's write failed, which it
        # then raises): a rank that reads it next (a restore) never meets it half-written.
        torch_dist.barrier()
    return written


def restore_trainer(trainer, folder: Path) -> TrainingState:
    """`trainer` as checkpoint `folder` left it (weights, optimizer, RNG, master weights); with
    several ranks each rank takes its own shards of the whole tensors the checkpoint holds."""
    load_weights = (lambda path: _load_shards(trainer.model, path)) if trainer.sharded else None
    if trainer.lora is not None:
        load_weights = lambda path: _load_adapter(trainer.model, path)  # noqa: E731
    state = load_checkpoint(folder, trainer.model, trainer.optimizer, load_weights)
    trainer.load_master_state(state.master)
    trainer.version = state.step
    return state


def _load_adapter(model, path: str) -> None:
    """An adapter-only checkpoint into `model`'s adapter: every adapter tensor, nothing else."""
    saved, mine = load_file(path), adapter_state_dict(model)
    if set(saved) != set(mine) or any(saved[n].shape != t.shape for n, t in mine.items()):
        raise UserError(f"{path}: not this run's LoRA adapter ({len(saved)} tensors, this run "
                        f"has {len(mine)} of rank {lora_rank(mine)}; was the checkpoint written "
                        "with another trainer.lora?)")
    with torch.no_grad():
        for name, tensor in mine.items():
            tensor.copy_(saved[name])


def _load_shards(model, path: str) -> None:
    """This rank's shards of the whole tensors in the model file (the rest whole)."""
    saved = read_weights(model, path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in saved:  # a tied tensor written once under its other name
                continue
            whole = saved[name]
            param.copy_(shard_like(whole, param) if is_sharded(param) else whole)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(folder: Path, model, optimizer, load_weights=None) -> TrainingState:
    """`load_weights(path)`: how the model takes the model file (default: whole, in the model's
    in-memory layout)."""
    state = json.loads((folder / "state.json").read_text())
    (load_weights or (lambda path: _load_whole(model, path)))(str(folder / "model.safetensors"))
    _load_optimizer(optimizer, folder, state["param_groups"])
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch_rng"])
    random.setstate(_tupled(state["python_rng"]))
    master_file = folder / "master.safetensors"
    master = load_file(str(master_file)) if master_file.exists() else None
    return TrainingState(state["step"], state["data_position"], state.get("extra", {}), master)


def _jsonable(rng_state):
    version, internal, gauss = rng_state
    return [version, list(internal), gauss]


def _tupled(data):
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
