"""Learned rewards (src/parityrl/rewards/): a reward model on a vLLM pooling engine and an LLM
judge on its own engine, their parity check (`doctor --reward-model`), and their faults."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from helpers import cli_in_process, digit_share_config, write_addition_rows
from parityrl.config import build_config
from parityrl.core.errors import UserError
from parityrl.rewards.config import JudgeParser
from parityrl.rewards.judge import parse_answer
from parityrl.runlog import read_metrics

JUDGE = {"model": "builtin:tiny", "template": "Is {prompt}{completion} right? ",
         "chat_template": False, "parser": {"type": "verdict"}}


def test_a_judge_needs_a_parser_and_a_slot_for_the_answer_and_a_reward_model_must_classify(
        tiny_model, tmp_path):
    """One line each, before anything starts: a judge without a parser, a template without
    {completion}, a reward model folder that is a causal LM."""
    with pytest.raises(UserError, match="rewards.judge needs a parser"):
        build_config({"rewards": {"judge": {k: v for k, v in JUDGE.items() if k != "parser"}}})
    with pytest.raises(UserError, match=r"has no \{completion\} slot"):
        build_config({"rewards": {"judge": JUDGE | {"template": "Is {prompt} right?"}}})
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": tiny_model, "rewards": {"models": [
        {"path": tiny_model}]}}))
    result = cli_in_process("train", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        f"error: reward model {tiny_model}: not a sequence-classification model (its "
        "architectures: Qwen2ForCausalLM); a reward model is a *ForSequenceClassification "
        "folder with one label"], result.stderr


def test_a_model_folder_among_trl_reward_funcs_is_a_reward_model(model_factory, tmp_path):
    """TRL's convention: an hf_dataset reward_funcs entry that is a model folder is served as a
    reward model, with its weight; the functions stay the task's."""
    rm = model_factory("reward")
    task = {"type": "hf_dataset", "path": str(tmp_path / "rows.jsonl"),
            "reward_funcs": ["trl_rewards:digit_share", rm], "reward_weights": [1.0, 0.5]}
    cfg = build_config({"task": task})
    assert (cfg.task.reward_funcs, cfg.task.reward_weights) == (["trl_rewards:digit_share"], [1.0])
    assert [(m.path, m.weight) for m in cfg.rewards.models] == [(rm, 0.5)]
    with pytest.raises(UserError, match="nothing rewards the run"):
        build_config({"task": task | {"reward_funcs": [], "reward_weights": None}})


def test_a_judges_answer_is_read_as_a_score_or_a_verdict_or_not_at_all():
    score, verdict = JudgeParser(type="score", scale=10), JudgeParser(type="verdict")
    assert parse_answer(score, "Score: 7/10") == 0.7
    assert parse_answer(score, "no number here") is None
    assert parse_answer(verdict, "Yes, it is right.") == 1.0
    assert parse_answer(verdict, "NO") == 0.0
    assert parse_answer(verdict, "yesterday maybe") is None


@pytest.mark.slow
def test_doctor_reward_model_passes_in_float32_and_names_an_activation_on_one_side(
        model_factory):
    """The same ids scored by the pooling engine and by transformers: within 1e-5 in float32,
    rankings alike. With the engine's activation left to vLLM (a sigmoid) it fails and says so."""
    from parityrl.doctor import DoctorConfig, run

    rm = model_factory("reward")
    report = run(DoctorConfig(reward_model=rm))
    assert report.passed, report.lines()
    assert report.diffs["engine vs transformers float32"]["max"] <= 1e-5
    assert all(report.rankings_agree) and report.findings == []
    bad = run(DoctorConfig(reward_model=rm, reward_engine_activation="vllm-default"))
    assert not bad.passed and bad.exit_code == 1
    assert bad.findings[0].startswith("activation: the engine applies a sigmoid"), bad.lines()


def engine_core_of(run_dir: Path, role: str) -> int:
    """The engine-core process of the run's reward model or judge (reward_engines.json)."""
    engines = json.loads((run_dir / "reward_engines.json").read_text())
    (pid,) = (engines["reward_models"][0] if role == "reward_model" else engines["judge"]
              )["engine_core_pids"]
    return pid


@pytest.mark.slow
@pytest.mark.usefixtures("plugins_importable")
def test_a_run_rewarded_by_a_reward_model_and_a_judge_survives_their_faults(
        tiny_model, model_factory, tmp_path):
    """Reward model + judge, the verifier only measuring (task_weight 0). After step 1 the
    reward model's engine core is SIGKILLed: it is restarted and the group scored again. After
    step 3 the judge's engine core is stopped (SIGSTOP) for longer than its timeout: its groups
    are rejected as judge_timeout, counted, and the run goes on. No problem is lost or done
    twice."""
    from parityrl.pipeline import run_training

    prompts = write_addition_rows(tmp_path / "prompts.jsonl")
    cfg = digit_share_config(tiny_model, prompts, **{
        "max_steps": 5, "actor.max_rejected_frac": 0.9,
        "rewards": {"task_weight": 0.0, "models": [{"path": model_factory("reward"),
                                                    "check_every": 1}],
                    "judge": JUDGE | {"timeout_s": 5.0, "max_tokens": 2}}})
    run_dir = tmp_path / "run"

    def fault(step: int, metrics: dict) -> None:
        if step == 1:
            os.kill(engine_core_of(run_dir, "reward_model"), signal.SIGKILL)
        if step == 3:
            judge = engine_core_of(run_dir, "judge")
            os.kill(judge, signal.SIGSTOP)
            threading.Timer(6.0, os.kill, (judge, signal.SIGCONT)).start()

    run_training(build_config(cfg), run_dir, on_step=fault, on_message=lambda m: None)
    rows = read_metrics(run_dir / "metrics.jsonl")
    last = rows[-1]
    assert [r["step"] for r in rows] == list(range(1, 6))
    for r in rows:  # the reward is the learned sources' sum; the verifier is measured beside it
        assert r["rl/reward_mean"] == pytest.approx(
            r["reward/reward_model_0_mean"] + r["reward/judge_mean"], abs=1e-6)
        assert 0.0 <= r["reward/verified_mean"] <= 1.0
        assert r["reward/model_0_vs_reference_max_abs"] <= 1e-5
    assert last["reward/engine_restarts"] == 1.0
    # The reference loads ran in threads: transformers' process-wide patch of tie_weights was put
    # back (two loads at once once left it a no-op, and every tied model built later untied).
    from transformers import PreTrainedModel
    assert PreTrainedModel.tie_weights.__qualname__ == "PreTrainedModel.tie_weights"
    assert last["rollouts/rejected_judge_timeout"] >= 1.0
    assert last["reward/judge_unparseable"] > 0  # a random tiny judge: counted, scored 0
    problems = read_metrics(run_dir / "problems.jsonl")
    done = [i for r in problems for kind in ("trained", "rejected") for i in r[kind]]
    assert len(done) == len(set(done))
    engines = json.loads((run_dir / "reward_engines.json").read_text())
    (rm,) = engines["reward_models"]
    assert (rm["runner"], rm["activation"], rm["pooler"]["seq_pooling_type"]) == (
        "pooling", "none", "LAST")
    assert engines["judge"]["sampling"]["temperature"] == 0.0 and engines["task_weight"] == 0.0
