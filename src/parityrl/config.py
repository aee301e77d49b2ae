"""The run configuration: typed, from YAML, with dotted CLI overrides, written out resolved.

    cfg = load_config("configs/reference.yaml", ["trainer.optim.lr=1e-4", "max_steps=20"])

Defaults < YAML < overrides. Unknown keys and wrong types are a one-line UserError. Every process
or actor of a run receives this one object (or its dump in the run directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from parityrl.core.errors import UserError
from parityrl.core.sampling import SamplingConfig
from parityrl.engine.settings import BITWISE_KNOBS, EngineKnobs, EngineSettings
from parityrl.rewards.config import RewardsConfig
from parityrl.rollouts.dynamic_sampling import DynamicSamplingConfig
from parityrl.tasks.arithmetic import ArithmeticConfig
from parityrl.tasks.environment import EnvConfig
from parityrl.tasks.registry import TaskConfig
from parityrl.trainer.config import ParityConfig, TrainerConfig
from parityrl.weights.lora_folder import engine_max_rank


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActorConfig(_Strict):
    group_size: int = Field(8, ge=1, description="Samples per prompt (G).")
    prompts_per_step: int = Field(16, ge=1, description="Groups in one optimizer step.")
    max_lag: int = Field(1, ge=0, description="Max optimizer steps between a token's sampling "
                                              "policy and the policy that trains on it.")
    max_groups_in_flight: int | None = Field(
        None, ge=1, description="Groups outstanding (in flight + queued); default "
                                "max(max_lag, 1) * prompts_per_step.")
    max_rejected_frac: float = Field(
        0.5, ge=0, le=1, description="Stop the run when more than this share of groups was "
                                     "rejected (prompt too long, reward error or timeout, engine "
                                     "refusal), judged from 8 groups on.")
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="A group still generating after this long means a stuck "
                                 "engine: it is restarted. None = wait forever.")
    max_restarts: int = Field(3, ge=0, description="Engine restarts allowed within "
                                                   "restart_window_s before the run stops.")
    restart_window_s: float = Field(600.0, gt=0, description="Seconds over which engine "
                                    "restarts are counted against max_restarts (a sliding "
                                    "window).")
    dynamic_sampling: DynamicSamplingConfig = Field(
        DynamicSamplingConfig(), description="rollouts/dynamic_sampling.py: drop groups whose "
                                             "rewards are all equal and draw others (DAPO).")


class RoleResources(_Strict):
    """What one Ray actor of a role asks the cluster for (Ray's logical resources)."""

    num_cpus: float = Field(1.0, ge=0, description="Ray logical CPUs each actor of the role "
                                                   "reserves (a cluster started for the run "
                                                   "gets at least their sum).")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs each actor of the role reserves.")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources, "
                                                                      "e.g. {node_a: 1}.")


class ClusterResources(_Strict):
    engine: RoleResources = Field(RoleResources(), description="What each engine actor asks "
                                                               "Ray for.")
    trainer: RoleResources = Field(RoleResources(), description="What each trainer rank's actor "
                                                                "asks Ray for.")
    rewards: RoleResources = Field(RoleResources(), description="What the learned rewards' actor "
                                                                "(its reward and judge engines) "
                                                                "asks Ray for.")


class ClusterConfig(_Strict):
    backend: Literal["local", "ray"] = Field(
        "local", description="local: the trainer and the actor in this process, each engine in "
                             "vLLM's own processes on this host. ray: every engine and every "
                             "trainer rank a Ray actor (parityrl/cluster/).")
    address: str | None = Field(
        None, description="ray: None starts a Ray cluster on this host for the run (stopped at "
                          "its end); 'auto' or HOST:PORT joins a running one (`ray start`).")
    engines: int = Field(1, ge=1, description="Engines generating side by side; more than one "
                                              "takes its updates over gloo (one broadcast "
                                              "updates them all).")
    trainer_ranks: int = Field(1, ge=1, description="Trainer processes (ray only): one "
                                                    "torch.distributed group, FSDP2 beyond one.")
    split_batch: bool = Field(
        True, description="Beyond one trainer rank: each rank runs forward and backward on its "
                          "share of the batch (data parallel). false: every rank computes the "
                          "whole batch, and the weights do not depend on the number of ranks "
                          "beyond float32 rounding (a split sums the gradients in another order, "
                          "which AdamW amplifies where a gradient is near zero).")
    object_store_mib: int = Field(512, ge=80, description="ray, cluster started for the run: "
                                                          "the object store's size (/dev/shm).")
    resources: ClusterResources = Field(ClusterResources(), description="ray: the logical "
                                        "resources each role's actors ask for (placement).")


class CheckpointConfig(_Strict):
    every: int = Field(50, ge=1, description="Save every N optimizer steps (and at the end).")
    keep: int = Field(2, ge=1, description="Checkpoints kept on disk.")


class RunConfig(_Strict):
    name: str = Field("run", description="Names the run directory (`runs/<name>-<date>-<time>` "
                                         "unless --out is given) and the progress bar.")
    seed: int = Field(0, description="Seeds the trainer (torch, random; a LoRA adapter's "
                                     "initialisation), the engine, and each group's sampling.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train; the run ends after "
                                                  "the last one.")
    mode: Literal["async", "sync"] = Field(
        "async", description="async: pipeline RL with in-flight weight updates; sync: generate a "
                             "batch, train, update, repeat (the conventional baseline).")
    model: str = Field("builtin:arithmetic-warm",
                       description="Hugging Face model folder, or builtin:<name> (models/builtin.py).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and activations dtype of both the engine and the trainer "
                               "(float16: trainer.optim.loss_scale.mode=auto becomes dynamic).")
    sync_every: int = Field(1, ge=1, description="Push weights every N optimizer steps.")
    engine: EngineKnobs = Field(EngineKnobs(), description="engine/settings.py: every "
                                "numerics knob and resource limit of vLLM.")
    sampling: SamplingConfig = Field(
        SamplingConfig(temperature=1.0, max_tokens=16), description="core/sampling.py: what "
        "each rollout request samples with; the trainer applies the same processing.")
    cluster: ClusterConfig = Field(ClusterConfig(), description="Where the engines and the "
                                   "trainer run: this host, or Ray actors.")
    task: TaskConfig = Field(default_factory=lambda: _default_task(), description="The problems "
                             "and their reward, chosen by `type` (tasks/).")
    env: EnvConfig | None = Field(None, description="Multi-turn episodes on the task's problems "
                                                    "(tasks/environment.py); None = single turn.")
    rewards: RewardsConfig = Field(RewardsConfig(), description="rewards/config.py: learned "
                                   "rewards (reward models, an LLM judge) beside the task's "
                                   "own, and the task's weight.")
    actor: ActorConfig = Field(ActorConfig(), description="The rollout actor: group sizes, "
                               "how far generation may run ahead, failure limits.")
    trainer: TrainerConfig = Field(TrainerConfig(), description="trainer/config.py: the policy "
                                   "update (loss, corrections, advantages, optimizer, LoRA).")
    parity: ParityConfig = Field(ParityConfig(), description="Engine/trainer logprob parity: "
                                 "bitwise mode, the live mismatch measurement and its alarm.")
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="Checkpoints in the "
                                         "run directory (resume with --resume).")
    tensorboard: bool = Field(True, description="Also write the metrics as TensorBoard scalars "
                                                "(`<run_dir>/tb`); metrics.jsonl is always "
                                                "written.")
    eval_every: int = Field(0, ge=0, description="Greedy accuracy on held-out problems before "
                                                 "training, every N steps and at the end; 0 = off.")
    eval_size: int = Field(200, ge=1, description="Held-out problems per evaluation (at most).")
    eval_pass_k: list[int] = Field(
        default_factory=list, description="With eval_every: each evaluation also samples "
        "eval_samples completions per held-out problem at the run's sampling settings and writes "
        "eval/pass@k for each k listed (the unbiased estimator) and eval/mean@n (the fraction of "
        "samples with reward 1); [] = greedy accuracy only.")
    eval_samples: int | None = Field(
        None, ge=1, description="Samples per held-out problem for eval_pass_k (n >= every k); "
                                "None = max(eval_pass_k).")
    report_waits_after_s: float = Field(
        30.0, gt=0, description="A wait longer than this (an engine start, rollouts of the "
                                "current version, a weight push, a Ray actor) says what it waits "
                                "for and since when, on the console and in errors.log; again "
                                "every as many seconds.")
    samples_every: int = Field(10, ge=0, description="Write a few rollouts (prompt, completion, "
                                                     "reward) to samples.jsonl every N steps "
                                                     "(and at step 1); 0 = off.")
    samples_per_log: int = Field(4, ge=1, description="Rollouts written each time.")

    @model_validator(mode="before")
    @classmethod
    def _reward_models_among_reward_funcs(cls, data):
        # TRL's convention: an hf_dataset reward_funcs entry that is a model folder is a reward
        # model. It is served as rewards.models are (with its weight); the functions stay.
        task = data.get("task") if isinstance(data, dict) else None
        if not isinstance(task, dict) or task.get("type") != "hf_dataset":
            return data
        funcs = list(task.get("reward_funcs") or [])
        weights = list(task.get("reward_weights") or [1.0] * len(funcs))
        folders = [isinstance(f, str) and (Path(f) / "config.json").is_file() for f in funcs]
        if not any(folders) or len(weights) != len(funcs):
            return data
        rewards = dict(data.get("rewards") or {})
        rewards["models"] = list(rewards.get("models") or []) + [
            {"path": f, "weight": w} for f, w, folder in zip(funcs, weights, folders) if folder]
        kept = [(f, w) for f, w, folder in zip(funcs, weights, folders) if not folder]
        task = {**task, "reward_funcs": [f for f, _ in kept],
                "reward_weights": [w for _, w in kept] if task.get("reward_weights") else None}
        return {**data, "task": task, "rewards": rewards}

    @model_validator(mode="before")
    @classmethod
    def _task_type_defaults_to_arithmetic(cls, data):
        # `task.digits=3` on the command line should refine the default task, not erase its type.
        if isinstance(data, dict) and isinstance(data.get("task"), dict):
            data = {**data, "task": {"type": "arithmetic", **data["task"]}}
        return data


    @model_validator(mode="after")
    def _honourable(self) -> "RunConfig":
        """Refuse at load what the code cannot do, instead of hanging or failing mid-run."""
        a = self.actor
        if self.mode == "async" and self.sync_every > a.max_lag + 1:
            raise ValueError(
                f"sync_every={self.sync_every} with actor.max_lag={a.max_lag}: in async mode every "
                f"batch would be more than max_lag steps old when trained on and no step would "
                f"ever be taken; use sync_every <= max_lag + 1")
        if (getattr(self.task, "type", None) == "hf_dataset" and not self.task.reward_funcs
                and not self.rewards.learned):
            raise ValueError("task.reward_funcs is empty and there is no rewards.models or "
                             "rewards.judge: nothing rewards the run")
        if self.env is not None and self.rewards.learned:
            raise ValueError("rewards.models / rewards.judge with env: a multi-turn episode's "
                             "reward is the environment's")
        if a.group_size == 1 and a.dynamic_sampling.enabled:
            raise ValueError("actor.dynamic_sampling with actor.group_size=1: a group of one has "
                             "all its rewards equal, every group would be dropped")
        if a.group_size == 1 and self.trainer.advantage.std_normalize:
            raise ValueError("actor.group_size=1 with trainer.advantage.std_normalize: a group of "
                             "one has no spread, every advantage would be 0; use group_size >= 2")
        self._check_pass_k()
        if self.parity.mode == "bitwise":
            self._resolve_bitwise()
        self._resolve_cluster()
        self._resolve_lora()
        self._resolve_loss_scale()
        self._resolve_length_knobs()
        if self.sampling.max_tokens >= self.engine.max_model_len:
            raise ValueError(f"sampling.max_tokens={self.sampling.max_tokens} leaves no room for a "
                             f"prompt in engine.max_model_len={self.engine.max_model_len}")
        return self

    def _resolve_length_knobs(self) -> None:
        """The knobs measured against sampling.max_tokens: seq-mean-token-sum's constant (the
        limit unless set, written resolved) and overlong shaping's window (below the limit)."""
        t, limit = self.trainer, self.sampling.max_tokens
        if t.overlong.mode == "shape" and t.overlong.window >= limit:
            raise ValueError(f"trainer.overlong.window={t.overlong.window} must be below "
                             f"sampling.max_tokens={limit}: the penalty grows over the window "
                             "before the limit")
        if t.loss.aggregation == "seq-mean-token-sum" and t.loss.aggregation_length is None:
            loss = t.loss.model_copy(update={"aggregation_length": limit})
            self.trainer = t.model_copy(update={"loss": loss})

    def _check_pass_k(self) -> None:
        ks, n = self.eval_pass_k, self.eval_samples
        if not ks:
            if n is not None:
                raise ValueError(f"eval_samples={n} without eval_pass_k: list the k values to "
                                 f"report, e.g. eval_pass_k=[1, {n}]")
            return
        if min(ks) < 1:
            raise ValueError(f"eval_pass_k={ks}: every k must be >= 1")
        if n is not None and n < max(ks):
            raise ValueError(f"eval_samples={n} is below max(eval_pass_k)={max(ks)}: pass@k needs "
                             f"at least k samples per problem")
        if not self.eval_every:
            raise ValueError("eval_pass_k needs eval_every > 0: it is computed by the held-out "
                             "evaluation, which eval_every=0 turns off")

    def _resolve_loss_scale(self) -> None:
        """auto → dynamic for float16 (5 exponent bits: small gradients flush to zero), off else;
        the run directory's config then says which."""
        scale = self.trainer.optim.loss_scale
        if scale.mode == "auto":
            mode = "dynamic" if self.dtype == "float16" else "off"
            optim = self.trainer.optim.model_copy(
                update={"loss_scale": scale.model_copy(update={"mode": mode})})
            self.trainer = self.trainer.model_copy(update={"optim": optim})

    def _resolve_cluster(self) -> None:
        """Several engines, or engines in Ray actors, take their updates over gloo: set when the
        config leaves the transport unset, refused when it asks for the shared file."""
        c = self.cluster
        if c.backend == "local" and c.trainer_ranks > 1:
            raise ValueError(f"cluster.trainer_ranks={c.trainer_ranks} runs the ranks as Ray "
                             "actors: add cluster.backend=ray")
        if c.backend == "local" and c.address is not None:
            raise ValueError("cluster.address joins a Ray cluster: add cluster.backend=ray")
        if c.engines == 1 and c.backend == "local":
            return
        if c.backend == "ray" and self.parity.mode == "bitwise":
            raise ValueError("parity.mode=bitwise scores with the engine's kernels in the "
                             "trainer's process: use cluster.backend=local")
        if self.trainer.lora is not None:
            return  # adapters reach each engine as a PEFT folder it writes: no transfer group
        why = (f"cluster.engines={c.engines}" if c.backend == "local"
               else "cluster.backend=ray")
        if "weight_transport" not in self.engine.model_fields_set:
            self.engine = self.engine.model_copy(update={"weight_transport": "gloo"})
        elif self.engine.weight_transport != "gloo":
            raise ValueError(f"{why} takes its weight updates over gloo, not "
                             f"engine.weight_transport={self.engine.weight_transport}")

    def _resolve_lora(self) -> None:
        """A LoRA run's engines hold adapters of its rank: engine.max_lora_rank follows
        trainer.lora.rank (vLLM's next allowed value) unless the config sets a larger one."""
        lora = self.trainer.lora
        if lora is None:
            return
        if self.cluster.trainer_ranks > 1:
            raise ValueError("trainer.lora with cluster.trainer_ranks > 1 is not built yet: the "
                             "adapter trains on one rank (FSDP2 sharding of adapters is not wired)")
        needed = engine_max_rank(lora.rank)
        if "max_lora_rank" in self.engine.model_fields_set and self.engine.max_lora_rank:
            if self.engine.max_lora_rank < lora.rank:
                raise ValueError(f"engine.max_lora_rank={self.engine.max_lora_rank} cannot hold "
                                 f"trainer.lora.rank={lora.rank}")
            return
        self.engine = self.engine.model_copy(update={"max_lora_rank": needed})

    def _resolve_bitwise(self) -> None:
        """Bitwise mode sets the engine knobs it needs; one the config set otherwise is refused."""
        if self.dtype != "float32":
            raise ValueError(f"parity.mode=bitwise is audited in float32 only, not dtype={self.dtype}")
        explicit = self.engine.model_fields_set
        for knob, needed in BITWISE_KNOBS.items():
            value = getattr(self.engine, knob)
            if knob in explicit and value != needed:
                raise ValueError(f"parity.mode=bitwise needs engine.{knob}={needed}, the config "
                                 f"sets {value}")
        self.engine = self.engine.model_copy(update=BITWISE_KNOBS)


def _default_task():
    return ArithmeticConfig()


def engine_settings(cfg: RunConfig, model_dir: str | Path) -> EngineSettings:
    """The EngineSettings of a run: its engine section plus model folder, dtype and seed."""
    return EngineSettings(model=str(model_dir), dtype=cfg.dtype, seed=cfg.seed,
                          **cfg.engine.model_dump())


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            # e.g. task.prompt_template={question}= : YAML reads {...} as a mapping
            raise UserError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)});"
                            f" quote it: {key}='\"...\"'") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_trees(base: dict, extra: dict) -> dict:
    """`extra` over `base`, section by section."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def build_config(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise UserError(f"config {where}: {err['msg']}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise UserError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read ({e})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"{_yaml_where(path, e)}: invalid YAML ({_yaml_problem(e)})") from None
        if data is None:
            raise UserError(f"{path}: the config file is empty")
        if not isinstance(data, dict):
            raise UserError(f"{path}: top level must be a mapping of keys, got "
                            f"{type(data).__name__}")
    extra = parse_overrides(list(overrides))
    task_override = extra.get("task")
    if isinstance(task_override, dict) and "type" in task_override:
        current = data.get("task") if isinstance(data.get("task"), dict) else {}
        if task_override["type"] != current.get("type", "arithmetic"):
            # Another kind of task: the old section's keys mean nothing to it.
            data = {**data, "task": {}}
    return build_config(merge_trees(data, extra))


def _yaml_where(path, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    return f"{context}: {problem}" if context else problem


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
