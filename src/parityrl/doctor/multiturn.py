"""The doctor's multi-turn check: conversations with a tool observation between the turns.

On the last rung's settings (the trainer's weights perturbed and pushed in place), each prompt
becomes an episode: the engine answers, a fixed calculator observation follows, the engine answers
again, all token-in/token-out (rollouts/episode.py). The trainer rescores the assistant tokens of
both turns with the same function as every rung; the result is judged by the same rule as the last
rung (engine as close to float64 as the trainer, nothing non-finite), with each turn's mismatch
shown, and each episode is rendered once more with the chat template to check that the template
reproduces the ids the engine saw. It runs on the ladder's engine after the last rung
(`run_ladder(..., on_multi_turn=...)`): no engine start of its own.

After the bitwise rung (`--bitwise`) it runs again with three turns on that rung's engine, scored
with the engine's kernels laid out turn by turn (each turn a fresh prefill of everything before
it, then its decode steps): judged as that rung is, every sampled token of every turn equal.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from parityrl.core.errors import UserError
from parityrl.core.sampling import SamplingConfig
from parityrl.doctor.rungs import Rung, RungResult
from parityrl.doctor.session import LadderSession, Preemptions
from parityrl.doctor.verdict import Consistency, bitwise_consistency, consistency
from parityrl.models.tokenizer import load_tokenizer
from parityrl.rollouts.episode import EpisodeLimits, engine_turns, run_episode
from parityrl.tasks.environment import EnvReply
from parityrl.tasks.prompts import as_messages

NAME = "multi-turn"
OBSERVATION = {"role": "user", "content": "CALC result: 42. Now reply with just the number."}


@dataclass
class MultiTurnResult:
    result: RungResult  # metrics over both turns, with mismatch/turn<k>/* added
    consistency: Consistency
    episodes: int
    unfaithful: list[str]  # the template check's findings, one per episode that failed it
    bitwise: bool = False  # scored with the engine's kernels: equal or not

    @property
    def passed(self) -> bool:
        return self.consistency.ok

    def lines(self) -> list[str]:
        m = self.result.metrics
        turns = sorted({int(k.split("/")[1][4:]) for k in m if k.startswith("mismatch/turn")})
        per_turn = "; ".join(f"turn {t}: {int(m[f'mismatch/turn{t}/tokens'])} tokens, max |Δ| "
                             f"{m[f'mismatch/turn{t}/max_abs_diff']:.3g}, mean |Δ| "
                             f"{m[f'mismatch/turn{t}/mean_abs_diff']:.3g}" for t in turns)
        verdict = "PASS" if self.passed else "FAIL"
        template = (f"the chat template reproduces the engine's ids in all {self.episodes} "
                    "episodes" if not self.unfaithful else
                    f"the chat template gives other ids than the engine saw in "
                    f"{len(self.unfaithful)} of {self.episodes} episodes (first: "
                    f"{self.unfaithful[0]}); training uses the engine's ids")
        kind = "multi-turn, bitwise" if self.bitwise else "multi-turn"
        return [f"{verdict} ({kind}, {_label(self.result.sampling)}): "
                f"{self.consistency.why}.", f"  {per_turn}", f"  {template}"]


def _label(s: SamplingConfig) -> str:
    return f"T={s.temperature:g}, top_p={s.top_p:g}, top_k={s.top_k}"


async def check_multi_turn(session: LadderSession, rung: Rung,
                           turns: int = 2) -> list[MultiTurnResult]:
    """One MultiTurnResult per sampling, on the engine `session` holds after `rung` (the ladder's
    last: its settings, the trainer's weights pushed); `turns` assistant turns an episode, the
    observation after each but the last."""
    cfg = session.cfg
    tokenizer = load_tokenizer(cfg.model)
    if not session.chat_template:
        raise UserError("the multi-turn check renders observations with the chat template, and "
                        "this model's tokenizer has none (or --no-chat-template was given)")
    engine = session.engine
    generate = engine_turns(engine)

    async def respond(messages, last_turn):
        if last_turn:
            return EnvReply(reward=0.0)
        return EnvReply(message=dict(OBSERVATION))

    limits = EpisodeLimits(max_turns=turns, max_model_len=cfg.max_model_len)
    eos = tokenizer.eos_token_id
    out = []
    for sampling in cfg.samplings:
        stopping = sampling.model_copy(update={"stop_token_ids": tuple(
            sorted(set(sampling.stop_token_ids) | ({eos} if eos is not None else set())))})
        preemptions = Preemptions(engine)
        episodes = await asyncio.gather(*[
            run_episode(generate, respond, tokenizer, as_messages(prompt), stopping, limits,
                        seed=cfg.seed + 1000 * i + j)
            for i, prompt in enumerate(cfg.prompts) for j in range(cfg.num_samples)])
        metrics, diffs, positions, e_err, t_err = session.measure(rung, episodes, sampling)
        preemptions.record(metrics)
        result = RungResult(NAME, NAME, sampling, engine.resolved_settings(), metrics, diffs,
                            positions, (), None, None, e_err, t_err)
        judged = bitwise_consistency(result) if rung.trainer_kernels else consistency(result)
        out.append(MultiTurnResult(result, judged, len(episodes),
                                   [e.template_mismatch for e in episodes
                                    if e.template_mismatch is not None],
                                   bitwise=rung.trainer_kernels))
    return out
