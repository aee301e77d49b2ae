"""The command line as a user meets it: one-line errors with exit 2, and a full doctor run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli_in_process

PARITYRL = [sys.executable, "-m", "parityrl.cli"]


def run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*PARITYRL, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture()
def empty_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n")
    return path


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "/nonexistent/model"], "model folder not found"),
        (["--model", "{empty_dir}"], "not a Hugging Face model folder"),
        (["--model", "{model}", "--dtype", "float8"], "unknown dtype"),
        (["--model", "{model}", "--temperature", "-1"], "temperature must be >= 0"),
        (["--model", "{model}", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--model", "{model}", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--model", "{model}", "--prompts", "{empty_prompts}"], "prompts file is empty"),
        (["--model", "{model}", "--prompts", "/nonexistent.txt"], "prompts file not found"),
        (["--model", "{model}", "--no-such-option"], "No such option"),
    ],
)
def test_doctor_bad_input(tmp_path, tiny_model, empty_prompts, args, fragment):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    args = [a.format(model=tiny_model, empty_dir=empty_dir, empty_prompts=empty_prompts)
            for a in args]
    _assert_one_line_error(run("doctor", *args), fragment)


def test_make_model_unknown_arch(tmp_path):
    _assert_one_line_error(run("make-model", str(tmp_path / "m"), "--arch", "gpt9"), "unknown arch")
    assert not (tmp_path / "m").exists()


def test_help_is_instant():
    proc = run("--help", timeout=20)
    assert proc.returncode == 0 and "doctor" in proc.stdout
    code = "import sys, parityrl.cli; print('vllm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.split() == ["False", "False"]


def test_make_model_refuses_to_replace_a_folder(tmp_path, tiny_model):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_one_line_error(run("make-model", str(out)), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
@pytest.mark.real
def test_make_model_from_gguf_truncates_a_real_model(tmp_path):
    from parityrl.models.gguf import packaged_smollm2

    out = tmp_path / "smol-1l"
    proc = run("make-model", str(out), "--from-gguf", str(packaged_smollm2()), "--layers", "1",
               timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    assert (out / "chat_template.jinja").exists() and (out / "model.safetensors").exists()
    _assert_one_line_error(run("make-model", str(tmp_path / "x"), "--from-gguf",
                               str(tmp_path / "missing.gguf")), "GGUF file not found")


def test_train_refuses_an_existing_run_and_leaves_it_byte_identical(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-000006").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: old\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: new\n")
    proc = run("train", str(cfg), "--out", str(run_dir), "max_steps=2")
    _assert_one_line_error(proc, "--resume")
    assert "--overwrite" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000006"]


def test_dry_run_checks_the_files_a_config_names(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: x\ntask:\n  type: jsonl\n  path: {tmp_path / 'missing.jsonl'}\n")
    _assert_one_line_error(run("train", str(cfg), "--dry-run"), "missing.jsonl: no such file")
    cfg.write_text(f"name: x\nmodel: {tmp_path / 'no-model'}\n")
    _assert_one_line_error(run("train", str(cfg), "--dry-run"), "model folder not found")


def test_resuming_a_finished_run_says_so_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-000005").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: x\nmax_steps: 5\n")
    proc = run("train", "--resume", str(run_dir), timeout=30)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_export_of_a_checkpoint_is_a_model_folder_the_doctor_passes(tmp_path, tiny_model,
                                                                   plugins_importable):
    from parityrl.config import build_config
    from parityrl.pipeline import run_training

    rows = "".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n"
                   for a in range(20))
    (tmp_path / "p.jsonl").write_text(rows)
    cfg = build_config({"model": tiny_model, "mode": "sync", "max_steps": 2,
                        "sampling": {"temperature": 1.0, "max_tokens": 8},
                        "task": {"type": "jsonl", "path": str(tmp_path / "p.jsonl"),
                                 "reward": "rewards:digit_share"},
                        "actor": {"group_size": 4, "prompts_per_step": 2},
                        "trainer": {"optim": {"lr": 1e-2}}, "tensorboard": False})
    run_training(cfg, tmp_path / "run", on_message=lambda m: None)
    proc = run("export", str(tmp_path / "run" / "checkpoints" / "step-000002"),
               str(tmp_path / "exported"))
    assert proc.returncode == 0, proc.stderr
    exported = tmp_path / "exported"
    assert json.loads((exported / "parityrl_export.json").read_text())["step"] == 2
    from safetensors.torch import load_file

    from parityrl.models.load import load_policy

    trained = load_policy(exported)  # transformers loads it, with the trained weights
    original = load_file(str(Path(tiny_model) / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(trained.state_dict()[name], original[name])
    doctor = cli_in_process("doctor", "--model", str(exported), "--quick", "--num-samples", "2",
                            "--max-tokens", "8")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    _assert_one_line_error(run("export", str(tmp_path / "run"), str(exported)), "--overwrite")


def test_help_texts_name_builtin_models_and_explain_quoting():
    doctor = run("doctor", "--help")
    assert doctor.returncode == 0 and "builtin:" in doctor.stdout
    train = run("train", "--help")
    assert train.returncode == 0 and "quote" in train.stdout.lower()


def test_a_cached_builtin_model_is_not_announced_as_being_built(tiny_model, monkeypatch, tmp_path):
    from parityrl.models.builtin import resolve_model

    monkeypatch.setenv("PARITYRL_CACHE", str(tmp_path))
    said: list[str] = []
    first = resolve_model("builtin:tiny", say=said.append)
    assert len(said) == 1 and "building builtin:tiny" in said[0]
    assert resolve_model("builtin:tiny", say=said.append) == first and len(said) == 1
    with pytest.raises(Exception, match="unknown built-in model"):
        resolve_model("builtin:nope", say=said.append)
    assert len(said) == 1  # nothing announced before the error


def test_readme_and_docs_point_only_at_files_in_the_repository():
    """The README is a front page (at most 250 lines) that links every page of docs/; every path
    the README and the docs name (configs/…, examples/…, parityrl/bench/…, ../README.md) exists,
    and so does every document (*.md) they name; bare file names such as metrics.jsonl are run
    outputs."""
    import re

    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    pages = sorted((root / "docs").glob("*.md"))
    assert pages and all(f"docs/{p.name}" in readme for p in pages), "a docs page not linked"
    documents = set()
    for _, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "__pycache__")]
        documents.update(f for f in files if f.endswith(".md"))
    missing = []
    for page in [root / "README.md", *pages]:
        text = page.read_text()
        names = set(re.findall(r"[\w./-]+\.(?:py|yaml|yml|jsonl|json|md|sh|toml)\b", text))
        missing += [f"{page.name}: {n}" for n in names if "/" in n
                    and not any((base / n).exists() for base in (root, root / "src", page.parent))]
        missing += [f"{page.name}: {n}" for n in names
                    if "/" not in n and n.endswith(".md") and n not in documents]
    assert not missing, missing
