"""Multi-turn episodes, token in / token out.

Turn k's prompt is turn k-1's prompt, the ids the engine sampled in turn k-1, and the observation
rendered with the chat template for the new message only. Sampled ids are never decoded and
re-tokenized into the next prompt (re-tokenizing can give ids the engine never sampled), so the
episode record holds exactly the tokens the engine saw, each with its origin, logprob, version and
turn. Afterwards the whole conversation is rendered with the chat template once more: where that
gives other ids than the engine saw (a template that rewrites history, text that does not
re-tokenize to the sampled ids), the episode is flagged with the first turn that differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from parityrl.core.errors import UserError
from parityrl.engine.routes import NOT_CAPTURED, full_length_routes
from parityrl.core.rollout import Rollout
from parityrl.core.sampling import SamplingConfig
from parityrl.tasks.environment import EnvReply, Message
from parityrl.tasks.prompts import encode_prompt

# One sampled turn: (prompt ids, sampling, seed) → the engine's rollout of that prompt.
Generate = Callable[[list[int], SamplingConfig, int], Awaitable[Rollout]]
# The environment's reply to the conversation so far: (messages, last_turn) → reply.
Respond = Callable[[list[Message], bool], Awaitable[EnvReply]]

_MARK = "PARITYRL-CONTENT-MARK"  # a probe message's content, found again in the rendered text


def engine_turns(engine) -> Generate:
    """`Generate` straight on a RolloutEngine: one sample per turn (no restart handling)."""
    async def generate(ids: list[int], sampling: SamplingConfig, seed: int | None) -> Rollout:
        (rollout,) = await engine.generate(ids, sampling, seed=seed)
        return rollout

    return generate


class EnvProtocolError(RuntimeError):
    """The environment broke the protocol (e.g. ended an episode without a reward)."""


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    max_model_len: int
    max_episode_tokens: int | None = None  # tokens after the first prompt


def _render(tokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def observation_ids(tokenizer, message: Message, last_sampled: int | None) -> list[int]:
    """The ids that close an assistant turn ending in `last_sampled`, show `message`, and open the
    next assistant turn, as the chat template renders them (for this one message only)."""
    ended = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _MARK}]
    rendered = _render(tokenizer, ended, add_generation_prompt=False)
    closing = rendered[rendered.rindex(_MARK) + len(_MARK):]  # e.g. "<|im_end|>\n"
    # The engine already sampled the template's end-of-turn token (its stop token): not twice.
    if last_sampled is not None and last_sampled in tokenizer.all_special_ids:
        end = tokenizer.decode([last_sampled])
        if closing.startswith(end):
            closing = closing[len(end):]
    # What the template adds for `message` and the next turn's opening, found as the difference
    # of two renderings. A template that rewrites earlier assistant turns once another message
    # follows breaks the first probe; the second has no assistant turn to rewrite (the episode's
    # template check then names the rewritten turn).
    for probe in (ended, ended[:1]):
        before = _render(tokenizer, probe, add_generation_prompt=False)
        after = _render(tokenizer, probe + [message], add_generation_prompt=True)
        if after.startswith(before):
            return tokenizer(closing + after[len(before):], add_special_tokens=False)["input_ids"]
    raise UserError(f"the chat template cannot render a {message['role']!r} message on its own "
                    "after earlier ones: observations cannot be appended token-in/token-out")


def template_mismatch(tokenizer, messages: list[Message], rollout: Rollout) -> str | None:
    """Where rendering the finished conversation with the chat template gives other ids than the
    engine saw: a sentence naming the first turn that differs; None when they agree."""
    rendered = encode_prompt(tokenizer, messages, chat_template=True, add_generation_prompt=False)
    seen = rollout.prompt_ids + rollout.completion_ids
    first = next((i for i, (a, b) in enumerate(zip(rendered, seen)) if a != b), None)
    if first is None and len(rendered) >= len(seen):
        return None  # the engine's ids are the rendering's (its tail closes the last turn)
    first = min(len(rendered), len(seen)) if first is None else first
    if first < len(rollout.prompt_ids):
        return f"the first prompt differs at token {first}"
    k = first - len(rollout.prompt_ids)
    turn = rollout.turn_index[k]
    where = "assistant tokens" if rollout.sampled_mask[k] else "the observation after it"
    return f"turn {turn} ({where}) differs at token {first}"


def merge_turn_routes(episode, turn, prompt_len: int):
    """An episode's MoE routes after a turn whose request had `prompt_len` prompt tokens.

    From the last prompt token on (it produced the turn's first sampled token) the turn's own
    routes; before it, each position keeps the routes of the first request that ran it (an
    observation is first run by the next turn's prefill). Every turn's prefill re-runs the earlier
    positions, and its routes can differ there at rounding ties: one trainer forward replays one
    route per position, and the one that produced the earlier turn's tokens is kept."""
    import numpy as np

    if turn is None:
        return episode
    if episode is None or len(episode) < len(turn):
        grown = np.full((len(turn), *turn.shape[1:]), NOT_CAPTURED, dtype=turn.dtype)
        if episode is not None:
            grown[: len(episode)] = episode
        episode = grown
    take = (episode[: len(turn)] == NOT_CAPTURED).all(axis=(1, 2))
    take[max(prompt_len - 1, 0):] = True
    episode[: len(turn)][take] = turn[take]
    return episode


async def run_episode(generate: Generate, respond: Respond, tokenizer, messages: list[Message],
                      sampling: SamplingConfig, limits: EpisodeLimits, seed: int) -> Rollout:
    """One episode from `messages`; the rollout's reward is the environment's, its meta holds the
    conversation, and its `template_mismatch` the template check's finding (None = faithful)."""
    messages = [dict(m) for m in messages]
    prompt_ids = encode_prompt(tokenizer, messages, chat_template=True)
    ids, completion, logprobs, versions, sampled, turns = list(prompt_ids), [], [], [], [], []
    reward, finish_reason, routes = None, None, None

    def room() -> int:  # tokens the episode may still add
        return min(limits.max_model_len - len(ids),
                   (limits.max_episode_tokens or limits.max_model_len) - len(completion))

    for turn in range(limits.max_turns):
        budget = min(sampling.max_tokens, room())
        turn_sampling = sampling.model_copy(update={"max_tokens": budget})
        out = await generate(ids, turn_sampling, seed + turn * 7919)
        routes = merge_turn_routes(routes, out.routes, len(ids))
        finish_reason = out.finish_reason
        completion += out.completion_ids
        logprobs += out.logprobs
        versions += out.versions
        sampled += [True] * out.num_tokens
        turns += [turn] * out.num_tokens
        ids += out.completion_ids
        messages.append({"role": "assistant",
                         "content": tokenizer.decode(out.completion_ids, skip_special_tokens=True)})
        last_id = out.completion_ids[-1] if out.completion_ids else None
        last_turn = turn == limits.max_turns - 1
        reply = await respond(messages, last_turn)
        if reply.message is not None and not last_turn:
            shown = observation_ids(tokenizer, reply.message, last_id)
            # The observation and at least one token of the next turn must fit.
            if len(shown) + 1 > room():
                last_turn = True
                reply = await respond(messages, last_turn)
        if reply.message is not None and last_turn:
            raise EnvProtocolError("the environment gave an observation on an episode's last "
                                   "turn instead of ending it with a reward")
        if reply.message is None:
            if reply.reward is None:
                raise EnvProtocolError("the environment ended an episode without a reward")
            reward = float(reply.reward)
            break
        messages.append(dict(reply.message))
        completion += shown
        logprobs += [0.0] * len(shown)
        versions += [-1] * len(shown)  # not sampled: no version
        sampled += [False] * len(shown)
        turns += [turn] * len(shown)
        ids += shown
    rollout = Rollout(prompt_ids=list(prompt_ids), completion_ids=completion, logprobs=logprobs,
                      versions=versions, finish_reason=finish_reason, reward=reward,
                      sampled=sampled, turns=turns)
    if routes is not None:
        rollout.routes = full_length_routes(routes, rollout)
    rollout.meta["messages"] = messages
    rollout.template_mismatch = template_mismatch(tokenizer, messages, rollout)
    return rollout
