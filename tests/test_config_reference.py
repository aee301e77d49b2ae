"""docs/config.md is generated from the typed configs and must not drift from them."""

from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from parityrl import config_reference
from parityrl.config_reference import REGENERATE, UndocumentedField, render

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_docs_config_md_is_the_generated_reference():
    expected = render()
    actual = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    assert actual == expected, (
        f"docs/config.md is stale (a config field was added, removed or changed): regenerate it "
        f"with `{REGENERATE}` and commit the result")


def test_every_run_config_key_is_in_the_reference():
    text = render()
    for key in ("trainer.optim.lr", "trainer.optim.loss_scale.mode", "trainer.correction.type",
                "cluster.resources.engine.num_cpus", "engine.kv_cache_gib", "parity.on_alarm",
                "env.max_turns", "task.reward_funcs", "task.answer_regex", "task.digits",
                "actor.restart_window_s", "sampling.max_tokens", "max_steps", "tensorboard"):
        assert f"| `{key}` |" in text, key
    for variant in ("arithmetic", "jsonl", "hf_dataset"):
        assert f"### task (type: {variant})" in text
    # The run's defaults, not the section class's: RunConfig.sampling sets max_tokens=16.
    assert "| `sampling.max_tokens` | `int`, ≥ 1 | `16` |" in text


def test_a_field_without_a_description_fails_loudly(monkeypatch):
    class Inner(BaseModel):
        documented: int = Field(1, description="Has one.")
        bare: int = 2

    class Outer(BaseModel):
        inner: Inner = Field(Inner(), description="A section.")

    missing: list[str] = []
    config_reference._walk(Outer, "", None, 2, "t", "", missing)
    assert missing == [f"{Inner.__module__}.{Inner.__qualname__}.bare (inner.bare)"]

    monkeypatch.setattr(config_reference, "RunConfig", Outer)
    with pytest.raises(UndocumentedField, match="inner.bare"):
        render()


def test_the_doctor_options_are_a_section_of_their_own(monkeypatch):
    class Doctor(BaseModel):
        """Options of the doctor."""

        num_samples: int = Field(4, ge=1, description="Samples per prompt.")
        tol: float | None = Field(None, description="A bound.")

    monkeypatch.setattr(config_reference, "doctor_config", lambda: Doctor)
    text = render()
    doctor = text[text.index("## Doctor options"):]
    assert "| `--num-samples` | `int`, ≥ 1 | `4` | Samples per prompt. |" in doctor
    assert "| `--tol` | `float \\| null` | `null` | A bound. |" in doctor
