import subprocess
import sys

import pytest
import yaml

from parityrl.config import build_config, dump_config, load_config, parse_overrides
from parityrl.core.errors import UserError


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_layer_in_that_order(tmp_path):
    path = write(tmp_path, "name: x\nmax_steps: 7\ntrainer:\n  optim:\n    lr: 0.001\n")
    cfg = load_config(path, ["trainer.optim.lr=2e-4", "sampling.temperature=0.7", "mode=sync"])
    assert cfg.name == "x" and cfg.max_steps == 7  # YAML over defaults
    assert cfg.trainer.optim.lr == 2e-4  # override over YAML
    assert cfg.sampling.temperature == 0.7 and cfg.mode == "sync"
    assert cfg.engine.enable_prefix_caching is False  # parity defaults
    assert cfg.engine.logprobs_mode == "processed_logprobs"


def test_a_run_engine_is_the_engine_settings_type_with_the_same_defaults():
    """One engine-settings type: what a run starts and what the doctor, bench and tests start
    with `EngineSettings(model=...)` cannot drift apart."""
    from parityrl.config import build_config, engine_settings
    from parityrl.engine.settings import EngineSettings

    cfg = build_config({"seed": 3, "dtype": "bfloat16"})
    run = engine_settings(cfg, "/m")
    assert run == EngineSettings(model="/m", dtype="bfloat16", seed=3)
    # null hands a knob to vLLM: it is left out of the engine arguments, recorded as resolved.
    left = engine_settings(build_config({"engine": {"logprobs_mode": None}}), "/m")
    assert "logprobs_mode" not in left.engine_kwargs()
    assert run.engine_kwargs()["logprobs_mode"] == "processed_logprobs"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["task.digits=3", "trainer.correction.type=tis"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "text, overrides, fragment",
    [
        ("trainer:\n  optim:\n    lrr: 1\n", [], "trainer.optim.lrr"),
        ("max_steps: many\n", [], "max_steps"),
        ("name: x\n", ["mode=turbo"], "mode"),
        ("name: x\n", ["task.type=chess"], "task"),
        ("name: x\n", ["sampling.top_p=2"], "top_p"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("a: [1,\n", [], "invalid YAML"),
        ("name: x\n", ["novalue"], "key.sub=value"),
        ("", [], "the config file is empty"),
        ("# only a comment\n", [], "the config file is empty"),
        ("name: x\ntrainer:\n\toptim: {}\n", [], "run.yaml:3:1: invalid YAML"),
        ("name: x\n", ["task.prompt_template={question}="], "quote it"),
        ("\ufeffname: x\nmax_steps: 0\n", [], "max_steps"),  # a BOM is fine, 0 is not
        ("name: x\n", ["cluster.engines=2", "engine.weight_transport=shm_file"],
         "over gloo, not engine.weight_transport=shm_file"),
        ("name: x\n", ["cluster.backend=ray", "engine.weight_transport=shm_file"],
         "cluster.backend=ray takes its weight updates over gloo"),
        ("name: x\n", ["cluster.trainer_ranks=2"], "add cluster.backend=ray"),
        ("name: x\n", ["cluster.address=auto"], "cluster.address joins a Ray cluster"),
        ("name: x\n", ["cluster.backend=ray", "parity.mode=bitwise"],
         "use cluster.backend=local"),
        ("name: x\n", ["cluster.backend=slurm"], "cluster.backend"),
        ("name: x\n", ["engine.weight_transport=nccl"], "weight_transport"),
        ("name: x\n", ["eval_every=5", "eval_pass_k=[0, 4]"], "every k must be >= 1"),
        ("name: x\n", ["eval_every=5", "eval_pass_k=[1, 8]", "eval_samples=4"],
         "eval_samples=4 is below max(eval_pass_k)=8"),
        ("name: x\n", ["eval_pass_k=[1, 4]"], "eval_pass_k needs eval_every > 0"),
        ("name: x\n", ["eval_every=5", "eval_samples=4"], "eval_samples=4 without eval_pass_k"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path, text, overrides, fragment):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, text), overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_eval_pass_k_is_off_by_default_and_loads_when_valid():
    assert load_config(None).eval_pass_k == [] and load_config(None).eval_samples is None
    cfg = load_config(None, ["eval_every=5", "eval_pass_k=[1, 4, 8]"])
    assert cfg.eval_pass_k == [1, 4, 8] and cfg.eval_samples is None  # n = max(k) = 8
    assert load_config(None, ["eval_every=5", "eval_pass_k=[1]", "eval_samples=16"]).eval_samples == 16


def test_override_values_are_yaml_typed():
    tree = parse_overrides(["a.b=3", "a.c=true", "d=[1, 2]", "e=hello"])
    assert tree == {"a": {"b": 3, "c": True}, "d": [1, 2], "e": "hello"}


def test_train_cli_bad_config_exit_2(tmp_path):
    path = write(tmp_path, "trainer:\n  loss:\n    type: dpo\n")
    proc = subprocess.run([sys.executable, "-m", "parityrl.cli", "train", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config trainer.loss.type")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_train_cli_dry_run_prints_resolved_config(tmp_path):
    path = write(tmp_path, "name: dry\n")
    proc = subprocess.run([sys.executable, "-m", "parityrl.cli", "train", str(path), "--dry-run",
                           "max_steps=3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "name: dry" in proc.stdout and "max_steps: 3" in proc.stdout
    assert "logprobs_mode: processed_logprobs" in proc.stdout


# --- property-based: whatever the input, a config or one line ---------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEYS = st.sampled_from(["name", "max_steps", "mode", "seed", "dtype", "sampling.temperature",
                        "sampling.top_p", "sampling.top_k", "actor.group_size", "actor.max_lag",
                        "sync_every", "trainer.optim.lr", "task.type", "task.digits",
                        "engine.max_model_len", "sampling.max_tokens", "no.such.key", "trainer"])
VALUES = st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True), st.booleans(),
                   st.text(max_size=12), st.sampled_from(["async", "sync", "jsonl", "float32",
                                                         "{a: 1}", "[1, 2", "null", "~"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEYS, VALUES), max_size=6))
def test_any_overrides_give_a_config_or_one_line_error(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        load_config(None, overrides)
    except UserError as e:
        assert "\n" not in str(e) and str(e)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_yaml_text_gives_a_config_or_one_line_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path)
    except UserError as e:
        assert "\n" not in str(e) and str(e)


def test_switching_the_task_type_on_the_command_line_replaces_the_section(tmp_path):
    path = write(tmp_path, "name: x\ntask:\n  type: arithmetic\n  digits: 3\n")
    cfg = load_config(path, ["task.type=jsonl", "task.path=data.jsonl"])
    assert cfg.task.type == "jsonl" and cfg.task.path == "data.jsonl"
    same = load_config(path, ["task.digits=2"])  # same type: refined, not replaced
    assert same.task.type == "arithmetic" and same.task.digits == 2


def test_several_engines_or_ray_resolve_the_transport_to_gloo(tmp_path):
    path = write(tmp_path, "name: x\n")
    assert load_config(path).engine.weight_transport == "shm_file"
    for overrides in (["cluster.engines=2"], ["cluster.backend=ray"]):
        cfg = load_config(path, overrides)
        assert cfg.engine.weight_transport == "gloo"
        # Written out resolved: the run directory's config.yaml loads back to the same.
        assert build_config(yaml.safe_load(dump_config(cfg))) == cfg
