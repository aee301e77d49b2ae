"""Multi-turn episodes: token-in/token-out bookkeeping, the chat-template check, loss masks, per-turn
parity, and an update that lands between two turns.

The first tests need no engine (the template check and the loss mask are functions of token ids);
the rest share one vLLM engine on the 4-layer SmolLM2-135M-Instruct (real tokenizer and template).
"""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from parityrl.config import build_config
from parityrl.models.load import load_policy
from parityrl.rollouts.episode import EpisodeLimits, engine_turns, observation_ids, \
    run_episode, template_mismatch
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.tasks.environment import EnvReply
from parityrl.tasks.prompts import encode_prompt
from parityrl.trainer.trainer import Trainer

QUESTION = [{"role": "user", "content": "What is 12 + 7? Use the calculator."}]
OBSERVATION = {"role": "user", "content": "CALC result: 19"}


def tokenizer_of(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def scripted_episode(tok, turns: list[list[int]]) -> tuple[Rollout, list[dict]]:
    """An episode assembled token-in/token-out from given assistant ids (as the runner does),
    with OBSERVATION between turns: the input of the template check."""
    messages = [dict(m) for m in QUESTION]
    prompt = encode_prompt(tok, messages, chat_template=True)
    completion, sampled, turn_of = [], [], []
    for k, ids in enumerate(turns):
        completion += ids
        sampled += [True] * len(ids)
        turn_of += [k] * len(ids)
        messages.append({"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)})
        if k < len(turns) - 1:
            shown = observation_ids(tok, OBSERVATION, ids[-1])
            completion += shown
            sampled += [False] * len(shown)
            turn_of += [k] * len(shown)
            messages.append(dict(OBSERVATION))
    n = len(completion)
    rollout = Rollout(prompt, completion, [-1.0] * n, [0] * n, "stop", sampled=sampled,
                      turns=turn_of)
    return rollout, messages


def test_token_in_token_out_is_what_the_template_renders(real_model_4l):
    tok = tokenizer_of(real_model_4l)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    turns = [tok.encode("CALC(12 + 7)") + [end], tok.encode("19") + [end]]
    rollout, messages = scripted_episode(tok, turns)
    assert template_mismatch(tok, messages, rollout) is None
    # Rendering the conversation up to the second turn gives exactly the second turn's prompt.
    second_prompt = encode_prompt(tok, messages[:3], chat_template=True)
    first_turn_end = len(rollout.prompt_ids) + rollout.turn_index.index(1)
    assert (rollout.prompt_ids + rollout.completion_ids)[:first_turn_end] == second_prompt
    assert rollout.num_tokens == sum(len(t) for t in turns) and rollout.num_turns == 2


def test_a_retokenization_that_changes_the_ids_is_detected(real_model_4l):
    tok = tokenizer_of(real_model_4l)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # "hello" sampled as two tokens: decoding then re-encoding gives one token the engine never
    # sampled.
    split = tok.encode("hel") + tok.encode("lo")
    assert tok.encode(tok.decode(split)) != split
    rollout, messages = scripted_episode(tok, [split + [end], tok.encode("19") + [end]])
    finding = template_mismatch(tok, messages, rollout)
    assert finding is not None and finding.startswith("turn 0 (assistant tokens)"), finding


DROPS_HISTORY = (  # like templates that drop earlier reasoning: earlier assistant turns emptied
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_template_that_drops_earlier_assistant_content_is_named_by_turn(real_model_4l):
    tok = tokenizer_of(real_model_4l)
    tok.chat_template = DROPS_HISTORY
    end = tok.convert_tokens_to_ids("<|im_end|>")
    turns = [tok.encode("CALC(12 + 7)") + [end], tok.encode("19") + [end],
             tok.encode("done") + [end]]
    rollout, messages = scripted_episode(tok, turns)
    finding = template_mismatch(tok, messages, rollout)
    assert finding is not None and finding.startswith("turn 0 (assistant tokens)"), finding


def test_the_calculator_answers_calls_and_scores_answers():
    from parityrl.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
    from parityrl.tasks.calculator import CalculatorEnv, calculate

    assert [calculate(e) for e in ("12 + 7", "(3+4)*2", "7/2", "-5")] == ["19", "14", "3.5", "-5"]
    for hostile in ("__import__('os')", "2**99999", "9" * 300, "1/0"):
        assert calculate(hostile).startswith("error:")
    task = ArithmeticTask(ArithmeticConfig(chat_template=True))
    env = CalculatorEnv(task)
    problem = task.train_problem(0)
    messages = env.start(problem)
    assert messages[0]["role"] == "system" and "CALC(" in messages[0]["content"]
    a, b = problem.answer, "x"
    call = env.respond(problem, [*messages, {"role": "assistant", "content": "CALC(2 * 21)"}],
                       last_turn=False)
    assert call.message == {"role": "user", "content": "CALC result: 42"} and call.reward is None
    for said, reward in ((a, 1.0), (b, 0.0)):
        end = env.respond(problem, [*messages, {"role": "assistant", "content": said}], False)
        assert end.message is None and end.reward == reward
    # On the last turn a call cannot be answered: the turn is scored as it is.
    assert env.respond(problem, [*messages, {"role": "assistant", "content": "CALC(1+1)"}],
                       last_turn=True).message is None


def test_observation_tokens_never_reach_the_loss(tiny_model):
    """Gradient at the last hidden state of every position that predicts an observation token is
    exactly zero (only the lm_head reads it), and garbage (NaN) behaviour logprobs there are never
    read; assistant positions do get gradient."""
    cfg = build_config({"model": tiny_model, "sampling": {"temperature": 1.0}})
    trainer = Trainer(cfg, load_policy(tiny_model), pad_id=0)
    sampled = [True] * 4 + [False] * 5 + [True] * 3
    n = len(sampled)
    rollouts = [Rollout([5, 6, 7], list(range(20, 20 + n)),
                        [-1.0 if s else math.nan for s in sampled], [0] * n, "stop",
                        group_id=0, reward=float(i), sampled=sampled,
                        turns=[0] * 9 + [1] * 3) for i in range(2)]
    # Behaviour logprobs = the trainer's own (ratio 1, nothing clipped), NaN at observations.
    from parityrl.trainer.batch import rollout_logprobs

    for r, score in zip(rollouts, rollout_logprobs(trainer.model, rollouts, cfg.sampling,
                                                   pad_id=0)):
        own = iter(score.logprobs.tolist())
        r.logprobs = [next(own) if s else math.nan for s in sampled]
    captured = {}

    def keep_grad(module, args, output):
        output.last_hidden_state.retain_grad()
        captured["hidden"] = output.last_hidden_state

    hook = trainer.model.get_decoder().register_forward_hook(keep_grad)
    state = trainer.accumulate([rollouts])
    hook.remove()
    grad = captured["hidden"].grad.abs().sum(-1)  # [B, T]
    p = 3
    # Position t predicts token t+1: completion token j is predicted at p - 1 + j.
    predicts_observation = [p - 1 + j for j, s in enumerate(sampled) if not s]
    predicts_assistant = [p - 1 + j for j, s in enumerate(sampled) if s]
    assert (grad[:, predicts_observation] == 0).all()
    assert (grad[:, predicts_assistant] > 0).all()
    assert state.tokens.skipped_samples == 0  # the NaN logprobs were never looked at
    metrics = trainer.apply(state)
    assert metrics["rl/tokens"] == 2 * sum(sampled)
    assert metrics["mismatch/turn0/tokens"] == 2 * 4 and metrics["mismatch/turn1/tokens"] == 2 * 3
    assert all(math.isfinite(v) for v in metrics.values())


# -- on the engine ---------------------------------------------------------------------------------
SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=12)


@pytest.fixture()
def engine(real_model_4l, loop):
    from helpers import engine_running

    from parityrl.engine.settings import EngineSettings

    with engine_running(loop, EngineSettings(model=real_model_4l)) as engine:
        yield engine


def chat_trainer(model_dir: str) -> Trainer:
    cfg = build_config({"model": model_dir, "sampling": SAMPLING.model_dump(),
                        "task": {"chat_template": True}})
    return Trainer(cfg, load_policy(model_dir), pad_id=tokenizer_of(model_dir).pad_token_id or 0)


@pytest.mark.slow
def test_the_shipped_multi_turn_recipe_in_bitwise_mode_is_exact_in_all_three_turns(
        real_model_4l, tmp_path, plugins_importable):
    """configs/calculator.yaml on the 4-layer copy in float32 with parity.mode=bitwise, its
    calculator environment making the call the model does not (tests/fixtures/envs.py): every
    episode has three turns, and the kernel pass, laying out each turn as the engine ran it (a
    fresh prefill of everything before the turn, then its decode steps), gives every sampled token
    of every turn the engine's logprob exactly, in a sync run and in the doctor's bitwise rung;
    the evaluation runs episodes too. (Per-turn parity in the default mode: the next test.)"""
    import json
    from pathlib import Path

    from parityrl.config import load_config
    from parityrl.doctor.ladder import run_ladder_sync
    from parityrl.doctor.rungs import LadderConfig, build_ladder
    from parityrl.pipeline import run_training
    from parityrl.runlog import read_metrics

    recipe = Path(__file__).parent.parent / "configs" / "calculator.yaml"
    cfg = load_config(recipe, [f"model={real_model_4l}", "dtype=float32", "parity.mode=bitwise",
                               "max_steps=2", "actor.group_size=2", "actor.prompts_per_step=2",
                               "sampling.max_tokens=8", "env.type=python",
                               "env.factory=envs:calculator_every_turn", "env.max_turns=3",
                               "eval_every=2", "eval_size=4", "samples_every=1",
                               "tensorboard=false"])
    run_training(cfg, tmp_path / "run", on_message=lambda m: None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    trained = [r for r in rows if "rl/tokens" in r]
    assert [r["step"] for r in trained] == [1, 2]
    for row in trained:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
        assert row["rollouts/turns_mean"] == 3.0 and row["engine/preemptions"] == 0
        assert all(row[f"mismatch/turn{t}/tokens"] > 0 for t in range(3))
        assert row["mismatch/tokens"] == row["rl/tokens"] > 0
        assert row["mismatch/max_abs_diff"] == 0.0, row
        assert row["rollouts/rejected_frac"] == 0 and "rollouts/template_mismatch" in row
    assert "eval/accuracy" in rows[-1]
    sample = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    turns = [m for m in sample["conversation"] if m["role"] != "system"]
    assert [m["role"] for m in turns] == ["user"] + ["assistant", "user"] * 2 + ["assistant"]
    assert turns[2]["content"].startswith("CALC result: ")

    checks = []
    doctor = LadderConfig(model=real_model_4l, samplings=[SamplingConfig(
        temperature=0.7, top_p=0.9, max_tokens=8)], num_samples=2,
        prompts=["What is 3 + 4?", "Name a colour."])
    run_ladder_sync(doctor, rungs=build_ladder(bitwise=True)[-1:], on_multi_turn=checks.append)
    (check,) = checks
    metrics = check.result.metrics
    assert check.bitwise and check.passed, check.lines()
    assert all(metrics[f"mismatch/turn{t}/tokens"] > 0 for t in range(3))
    assert metrics["mismatch/max_abs_diff"] == 0.0 and set(check.result.abs_diffs) == {0.0}


@pytest.mark.slow
def test_an_update_between_turns_gives_two_versions_and_parity_only_on_same_version_tokens(
        engine, loop, real_model_4l):
    from parityrl.doctor.session import perturb_in_place

    tok = tokenizer_of(real_model_4l)
    trainer = chat_trainer(real_model_4l)
    perturb_in_place(trainer.model, 0.05, seed=3)  # the weights of the next version
    responded, resume = threading.Event(), threading.Event()

    generate = engine_turns(engine)

    async def respond(messages, last_turn):
        if sum(m["role"] == "assistant" for m in messages) == 1:
            responded.set()
            await asyncio.to_thread(resume.wait)  # the update lands here, between the turns
            return EnvReply(message=dict(OBSERVATION))
        return EnvReply(reward=0.0)

    async def scenario():
        sampling = SAMPLING.model_copy(update={"stop_token_ids": (tok.eos_token_id,)})
        episodes = [asyncio.create_task(run_episode(
            generate, respond, tok, QUESTION, sampling, EpisodeLimits(3, 256), seed=s))
            for s in range(4)]
        await asyncio.to_thread(responded.wait)
        old = engine.version
        await engine.update_weights(trainer.model.state_dict())
        resume.set()
        return old, engine.version, await asyncio.gather(*episodes)

    old, new, episodes = loop.run_until_complete(scenario())
    trainer.version = new
    for episode in episodes:
        by_turn = {t: v for t, v in zip(episode.sampled_turns, episode.sampled_versions)}
        assert episode.num_turns == 2 and by_turn == {0: old, 1: new}, by_turn
        assert episode.min_version == old and episode.max_version == new
    state = trainer.accumulate([episodes])
    metrics = trainer.apply(state)
    second_turn_tokens = sum(t == 1 for e in episodes for t in e.sampled_turns)
    assert metrics["mismatch/tokens"] == second_turn_tokens == metrics["mismatch/turn1/tokens"]
    assert "mismatch/turn0/tokens" not in metrics
    assert metrics["mismatch/max_abs_diff"] <= 1e-4, metrics
    assert metrics["lag/mixed_version_frac"] == 1.0
    # The first turn, sampled by the old weights, would not agree with the new ones.
    assert metrics["rl/tokens"] > second_turn_tokens
    first_turn = [lp for e in episodes for lp, t in zip(e.sampled_logprobs, e.sampled_turns)
                  if t == 0]
    from parityrl.trainer.batch import rollout_logprobs

    scored = rollout_logprobs(trainer.model, episodes, trainer.cfg.sampling, pad_id=0)
    rescored = [lp for e, s in zip(episodes, scored)
                for lp, t in zip(s.logprobs.tolist(), e.sampled_turns) if t == 0]
    assert max(abs(a - b) for a, b in zip(first_turn, rescored)) > 1e-2


@pytest.mark.slow
def test_an_environment_that_raises_or_hangs_rejects_its_group_and_the_rest_goes_on(
        engine, loop, real_model_4l, plugins_importable):
    from parityrl.rollouts.actor import Actor, ActorLimits
    from parityrl.tasks.environment import EnvConfig
    from parityrl.tasks.registry import build_environment
    from parityrl.tasks.registry import build_task

    tok = tokenizer_of(real_model_4l)
    task = build_task(build_config({"task": {"chat_template": True}}).task)
    env_config = EnvConfig(type="python", factory="envs:faulty", timeout_s=2.0)
    seen = []
    actor = Actor(engine, task, tok, SAMPLING.model_copy(update={"max_tokens": 4}), group_size=2,
                  seed=0, limits=ActorLimits(max_model_len=256, max_rejected_frac=1.0),
                  env=build_environment(env_config, task), env_config=env_config,
                  on_error=lambda kind, error: seen.append(kind))
    answers = [task.train_problem(i).answer for i in range(8)]
    groups = loop.run_until_complete(actor.generate_batch(8))
    raising = sum(int(a) % 2 == 0 for a in answers)
    hanging = sum(int(a) % 2 == 1 and a.endswith("5") for a in answers)
    assert raising and hanging, answers  # the first 8 problems cover both faults
    metrics = actor.metrics()
    assert metrics["rollouts/rejected_env_error"] == raising
    assert metrics["rollouts/rejected_env_timeout"] == hanging
    assert len(groups) == 8 - raising - hanging and all(len(g) == 2 for g in groups)
    assert {"env_error", "env_timeout"} <= set(seen)
