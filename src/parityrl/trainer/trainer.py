"""The RL trainer: one optimizer step on a batch of rollout groups, in named phases.

    advantages → micro-batches (token budget) → forward with `token_logprobs` (the doctor's
    function) → policy loss (+ correction, KL, entropy) → backward → clip → AdamW step

Per-token statistics of the step are gathered on the way and turned into the metrics listed in the README (Training).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parityrl.core.errors import UserError
from parityrl.core.mismatch import mismatch_metrics, per_turn_mismatch
from parityrl.core.rollout import Group, Rollout
from parityrl.trainer.advantages import group_advantages
from parityrl.trainer.batch import collate, rollout_logprobs
from parityrl.trainer.checkpoint import restore_trainer, save_trainer
from parityrl.trainer.config import RunSections
from parityrl.trainer.distributed import (
    DistContext,
    average_replicated_grads,
    clip_grad_norm,
    data_parallel_shares,
    full_state_dict,
    full_tensor,
    gather_objects,
    is_sharded,
    shard_like,
    shard_model,
)
from parityrl.trainer.engine_kernels import (
    EngineKernels,
    check_bitwise_supported,
    check_engine_for_bitwise,
)
from parityrl.trainer.float64 import Float64Reference, exact_logprobs, precision_metrics
from parityrl.trainer.layout import checkpoint_state_dict
from parityrl.trainer.logprobs import token_logprobs
from parityrl.trainer.lora import adapter_state_dict, lora_settings
from parityrl.trainer.loss_scale import DynamicLossScale
from parityrl.trainer.objectives import aggregate_loss, kl_k3, policy_loss
from parityrl.trainer.overlong import is_truncated, length_penalty
from parityrl.trainer.routing import ROUTING_COMPARED, RouteCounts


@dataclass
class StepTokens:
    """Detached per-token tensors of one step, concatenated over micro-batches."""

    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    skipped_samples: int = 0  # samples left out of the loss: a non-finite logprob on either side

    def add(self, **tensors: torch.Tensor | None) -> None:
        for name, value in tensors.items():
            if value is not None:
                self.parts.setdefault(name, []).append(value.detach().float().cpu())

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.cat(self.parts[name])

    def __contains__(self, name: str) -> bool:
        return name in self.parts


def gather_step_tokens(mine: StepTokens) -> StepTokens:
    """Every rank's per-token statistics, concatenated in rank order (a collective)."""
    merged = StepTokens()
    for part in gather_objects(mine):
        for name, tensors in part.parts.items():
            merged.parts.setdefault(name, []).extend(tensors)
        merged.skipped_samples += part.skipped_samples
    return merged


def microbatches(rollouts: list[Rollout], token_budget: int) -> list[list[Rollout]]:
    """Consecutive chunks whose padded size (rows × longest row) stays within the budget."""
    chunks: list[list[Rollout]] = [[]]
    longest = 0
    for r in rollouts:
        length = len(r.prompt_ids) + len(r.completion_ids)
        if chunks[-1] and max(longest, length) * (len(chunks[-1]) + 1) > token_budget:
            chunks.append([])
            longest = 0
        chunks[-1].append(r)
        longest = max(longest, length)
    return chunks


class Trainer:
    def __init__(self, cfg: RunSections, model, pad_id: int, ref_model=None,
                 dist: DistContext | None = None) -> None:
        """`dist`: this trainer is one rank of several (trainer/distributed.py); it shards
        `model` with FSDP2 itself, and every rank must make the same calls with the same data.
        The ranks share the memory of the decoder layers' parameters, gradients and optimizer
        state and, with `cluster.split_batch`, the compute of the loss: each rank runs forward
        and backward on its own share of the batch (data parallel)."""
        self.cfg = cfg
        self.dist = dist
        self.sharded = dist is not None and dist.world_size > 1
        self.split_batch = self.sharded and cfg.cluster.split_batch
        if self.sharded and cfg.parity.mode == "bitwise":
            raise UserError("parity.mode=bitwise scores with the engine's kernels on whole "
                            "weights: use one trainer rank")
        self.replicated = shard_model(model) if self.sharded else []
        self.model = model.train()
        self.ref_model = ref_model
        self.pad_id = pad_id
        opt = cfg.trainer.optim
        # With a LoRA adapter (trainer/lora.py) only its tensors train; the base is frozen.
        self.lora = lora_settings(model)
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        # In bfloat16/float16 an AdamW update is mostly below the weights' resolution: the
        # optimizer steps float32 master copies and the model (what the forward and the engine
        # see) gets them rounded to its own dtype after each step.
        low_precision = any(p.dtype != torch.float32 for p in self.params)
        self.master = ([torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
                       if low_precision and opt.master_weights == "float32" else None)
        # foreach kernels do not take sharded (DTensor) and whole tensors in one list.
        self.optimizer = torch.optim.AdamW(self.master or self.params, lr=opt.lr,
                                           betas=opt.betas, weight_decay=opt.weight_decay,
                                           foreach=False if self.sharded else None)
        # float16: the loss scaled before backward, overflowing steps skipped (trainer/loss_scale.py)
        self.loss_scale = (DynamicLossScale(opt.loss_scale)
                           if opt.loss_scale.mode == "dynamic" else None)
        self.version = 0  # optimizer steps taken; the engine holds the same number after a push
        self.nonfinite_streak = 0  # consecutive steps whose gradient was not finite
        self.kernels = None  # bitwise mode: the engine's kernels (use_engine_kernels)
        self.replay_routes = cfg.trainer.moe_routing == "replay"
        if cfg.parity.mode == "bitwise":
            check_bitwise_supported(model)  # refuse before an engine starts

    def use_engine_kernels(self, resolved: dict) -> None:
        """Bitwise mode: score with the engine's own kernels, laid out as the engine `resolved`
        (RolloutEngine.resolved_settings) runs; refuses an engine bitwise parity cannot hold on."""
        check_engine_for_bitwise(resolved)
        self.kernels = EngineKernels.for_engine(self.model, resolved, self.kernels)

    # -- phases ---------------------------------------------------------------------------------
    def _assign_advantages(self, groups: list[Group]) -> list[Rollout]:
        rollouts = []
        for group in groups:
            rewards = torch.tensor([r.reward + self._length_penalty(r) for r in group],
                                   dtype=torch.float64)
            for r, a in zip(group, group_advantages(rewards, self.cfg.trainer.advantage)):
                r.advantage = float(a)
                rollouts.append(r)
        return rollouts

    def _length_penalty(self, rollout: Rollout) -> float:
        """trainer.overlong.mode=shape: the completion's soft length penalty (kept in its meta)."""
        overlong = self.cfg.trainer.overlong
        if overlong.mode != "shape":
            return 0.0
        penalty = length_penalty(rollout.num_tokens, self.cfg.sampling.max_tokens, overlong)
        rollout.meta["overlong_penalty"] = penalty
        return penalty

    def _in_loss(self, rollout: Rollout) -> bool:
        """trainer.overlong.mode=mask leaves the completions cut at max_tokens out of the loss."""
        return self.cfg.trainer.overlong.mode != "mask" or not is_truncated(rollout)

    def _microbatch_loss(self, chunk: list[Rollout], total_tokens: int, num_seqs: int,
                         stats: StepTokens):
        tcfg = self.cfg.trainer
        device = next(self.model.parameters()).device
        batch = collate(chunk, self.pad_id).to(device)
        out = token_logprobs(self.model, batch.input_ids, batch.attention_mask,
                             batch.completion_mask, self.cfg.sampling,
                             fp32_lm_head=tcfg.fp32_lm_head, kernels=self.kernels,
                             routes=batch.routes, replay_routes=self.replay_routes)
        if out.routes is not None:  # compared where the engine's weights were the trainer's
            current = torch.tensor([self.sampled_by_current(r) for r in chunk])
            stats.add(route_compared=out.routes.compared[current],
                      route_differ=out.routes.differ[current])
        mask = out.mask
        rows = torch.arange(len(chunk), device=device).unsqueeze(1).expand_as(mask)[mask]
        # A sample with a non-finite logprob on either side never reaches the loss or a mean.
        finite = torch.isfinite(out.logprobs[mask].detach()) & torch.isfinite(
            batch.engine_logprobs[mask])
        bad_rows = rows[~finite].unique()
        stats.skipped_samples += int(bad_rows.numel())
        keep = ~torch.isin(rows, bad_rows)
        if not keep.any():
            if self.split_batch:  # the other ranks are in this micro-batch's collectives
                self._idle_backward()
            return
        lp = out.logprobs[mask][keep]
        lp_b = batch.engine_logprobs[mask][keep]
        outside = out.outside_nucleus[mask][keep]
        rows = rows[keep]
        adv = torch.tensor([r.advantage for r in chunk], device=device)[rows]
        terms = policy_loss(lp, lp_b, adv, rows, len(chunk), tcfg.loss, tcfg.correction)
        loss = terms.loss
        entropy = out.entropy[mask][keep]
        kl_ref = None
        if tcfg.loss.kl_coef > 0 and self.ref_model is not None:
            with torch.no_grad():
                ref = token_logprobs(self.ref_model, batch.input_ids, batch.attention_mask,
                                     batch.completion_mask, self.cfg.sampling,
                                     fp32_lm_head=tcfg.fp32_lm_head, with_entropy=False)
            kl_ref = kl_k3(lp, ref.logprobs[mask][keep])
            loss = loss + tcfg.loss.kl_coef * kl_ref
        if tcfg.loss.entropy_coef > 0:
            loss = loss - tcfg.loss.entropy_coef * entropy
        scale = self.dist.world_size if self.split_batch else 1  # undoes FSDP's average
        if self.loss_scale is not None:
            scale = scale * self.loss_scale.scale
        lengths = torch.tensor([r.num_tokens for r in chunk], device=device)
        step_loss = aggregate_loss(loss, rows, lengths, tcfg.loss.aggregation,
                                   total_tokens=total_tokens, num_seqs=num_seqs,
                                   length=tcfg.loss.aggregation_length)
        (step_loss * scale).backward()
        # Flattened in the order of `out.logprobs[mask]`: row by row, sampled tokens in order.
        pure = torch.tensor([p for r in chunk for p in r.parity_mask(self.version)],
                            device=device)[keep]
        turns = torch.tensor([t for r in chunk for t in r.sampled_turns], device=device)[keep]
        stats.add(lp=lp, lp_b=lp_b, versions=batch.versions[mask][keep], pure=pure, turns=turns,
                  outside=outside, ratio=terms.ratio, clipped=terms.clipped, entropy=entropy,
                  adv=adv, loss=loss, kl_ref=kl_ref, is_weight=terms.is_weight,
                  truncated=terms.truncated, masked=terms.masked)

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip and step; a non-finite gradient norm is not applied (the weights stay as they
        are, the version still advances so that step numbers and engine versions stay aligned)."""
        if self.sharded:
            average_replicated_grads(self.replicated)
        if self.master is not None:
            for master, param in zip(self.master, self.params):
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None
        stepped = self.master or self.params
        if self.loss_scale is not None:  # unscaled before the norm: clipping sees true gradients
            with torch.no_grad():
                for p in stepped:
                    if p.grad is not None:
                        p.grad.div_(self.loss_scale.scale)
        clip = clip_grad_norm if self.sharded else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(stepped, self.cfg.trainer.optim.grad_clip)
        applied = bool(torch.isfinite(grad_norm))
        if applied:
            self.optimizer.step()
            if self.master is not None:
                with torch.no_grad():
                    for master, param in zip(self.master, self.params):
                        param.copy_(master)
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        return float(grad_norm), applied

    def weights(self) -> dict[str, torch.Tensor]:
        """What the engines load and checkpoints hold: the whole state dict (HF names), or with
        LoRA the adapter's tensors only (PEFT names). With several ranks a collective: every
        rank calls it."""
        if self.lora is not None:
            return adapter_state_dict(self.model)
        return checkpoint_state_dict(self.model,
                                     full_state_dict(self.model) if self.sharded else None)

    def save_checkpoint(self, run_dir, step: int, data_position: int, keep: int,
                        extra: dict | None = None) -> None:
        if self.loss_scale is not None:
            extra = {**(extra or {}), "loss_scale": self.loss_scale.state()}
        save_trainer(self, run_dir, step, data_position, keep, extra)

    def restore(self, folder):
        """This trainer as checkpoint `folder` left it; returns the checkpoint's TrainingState."""
        state = restore_trainer(self, folder)
        if self.loss_scale is not None:
            self.loss_scale.load(state.extra.get("loss_scale"))
        return state

    def master_state(self) -> dict[str, torch.Tensor] | None:
        """The float32 master weights by parameter name (None when the model itself is float32).
        With several ranks they are gathered whole (a collective: every rank calls it)."""
        if self.master is None:
            return None
        return {n: full_tensor(m) for n, m in zip(self.param_names, self.master)}

    def load_master_state(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """Restore master weights (from a checkpoint, or from the model when it has none).
        With several ranks `tensors` are whole and each rank keeps its own shard of them."""
        if self.master is None:
            return
        with torch.no_grad():
            for name, param, master in zip(self.param_names, self.params, self.master):
                source = tensors[name] if tensors and name in tensors else param
                if is_sharded(master) and not is_sharded(source):
                    source = shard_like(source, master)
                master.copy_(source.float())

    # -- the step -------------------------------------------------------------------------------
    def accumulate(self, groups: list[Group]) -> "StepState":
        """Forward and backward over `groups`; gradients are accumulated, weights unchanged.

        With several ranks and `cluster.split_batch`, every rank is given every group
        (advantages are per group) and computes its own contiguous share of the rollouts; each
        scales its loss by the number of ranks, since FSDP averages the gradients over them.
        The per-token statistics are gathered back in batch order, so every rank's metrics are
        the whole batch's."""
        rollouts = self._assign_advantages(groups)
        # The loss's denominators count every sampled token (and sequence) learned from or not,
        # but those overlong masking leaves out.
        counted = [r for r in rollouts if self._in_loss(r)]
        total_tokens = max(sum(r.num_tokens for r in counted), 1)
        num_seqs = max(len(counted), 1)
        state = StepState(rollouts, StepTokens(), self.version)
        budget = self.cfg.trainer.optim.tokens_per_microbatch
        learned = state.learned = self._rollouts_to_learn(counted)
        shares = data_parallel_shares(learned, self.dist) if self.split_batch else [learned]
        per_rank = [[c for c in microbatches(share, budget) if sum(r.num_tokens for r in c)]
                    for share in shares]
        mine = per_rank[self.dist.rank if self.split_batch else 0]
        state.local_rollouts = sum(len(c) for c in mine)
        for chunk in mine:
            self._microbatch_loss(chunk, total_tokens, num_seqs, state.tokens)
        if self.split_batch:
            # Every rank joins every FSDP collective: as many backward passes as the busiest rank.
            for _ in range(max(map(len, per_rank)) - len(mine)):
                self._idle_backward()
                state.idle_passes += 1
            state.tokens = gather_step_tokens(state.tokens)
        return state

    def _rollouts_to_learn(self, rollouts: list[Rollout]) -> list[Rollout]:
        """The rollouts that go through forward and backward, in micro-batch order. A rollout
        with advantage exactly 0 adds exactly 0 to the gradient of every policy loss here
        (each term is a multiple of the advantage) unless a KL or entropy term is on."""
        tcfg = self.cfg.trainer
        if tcfg.skip_zero_advantage and tcfg.loss.kl_coef == 0 and tcfg.loss.entropy_coef == 0:
            rollouts = [r for r in rollouts if r.advantage != 0.0]
        if tcfg.sort_by_length:
            rollouts = sorted(rollouts, key=lambda r: len(r.prompt_ids) + len(r.completion_ids))
        return rollouts

    def _idle_backward(self) -> None:
        """A forward and backward through the decoder that adds nothing to any gradient: what a
        rank with fewer micro-batches than another runs, so that both make the same FSDP
        collectives (each layer's all-gather and reduce-scatter)."""
        device = next(self.model.parameters()).device
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=device)
        hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state
        (hidden.sum() * 0.0).backward()

    def probe_parity(self, state: "StepState", rollouts: list[Rollout]) -> None:
        """Score extra rollouts sampled by the current weights (e.g. queued for the next step).

        Called between `accumulate` and `apply`, while the weights still are the ones that
        sampled them: in pipeline mode most of a batch is one step old, so this is where exact
        parity is measured.
        """
        pure = [r for r in rollouts if self.has_parity_tokens(r)]
        if not pure:
            return
        state.probe_rollouts.extend(pure)
        was_training = self.model.training
        scored = rollout_logprobs(self.model, pure, self.cfg.sampling, pad_id=self.pad_id,
                                  fp32_lm_head=self.cfg.trainer.fp32_lm_head,
                                  kernels=self.kernels, replay_routes=self.replay_routes)
        self.model.train(was_training)
        for rollout, score in zip(pure, scored):
            if score.routes is not None and self.sampled_by_current(rollout):
                state.probe_routes.append(score.routes)
            keep = self.parity_tokens(rollout)
            state.probe_train.append(score.logprobs[keep])
            state.probe_engine.append(torch.tensor(rollout.sampled_logprobs)[keep])
            state.probe_outside.append(score.outside_nucleus[keep])
            state.probe_turns.append(torch.tensor(rollout.sampled_turns)[keep])

    def score_exact(self, state: "StepState") -> None:
        """Before `apply`, the parity tokens scored again: in float64 (parity.fp64_reference),
        and with the trainer's own routing while it replays the engine's (MoE,
        parity.compare_routing)."""
        # The same rollouts, in the same order, as the tokens of the mismatch metrics: those that
        # went through forward and backward, in micro-batch order.
        parity = [r for r in state.learned if self.has_parity_tokens(r)] + state.probe_rollouts
        if self.replay_routes and self.cfg.parity.compare_routing and parity:
            own = rollout_logprobs(self.model, parity, self.cfg.sampling, pad_id=self.pad_id,
                                   fp32_lm_head=self.cfg.trainer.fp32_lm_head)
            state.recompute_lp = torch.cat([o.logprobs[self.parity_tokens(r)]
                                            for o, r in zip(own, parity)])
        if not self.cfg.parity.fp64_reference:
            return
        if self.sharded:  # a whole float64 copy from the gathered weights, on every rank
            exact = Float64Reference.from_weights(self.model.config, self.weights()).logprobs(
                parity, self.cfg.sampling, pad_id=self.pad_id)
        else:
            exact = exact_logprobs(self.model, parity, self.cfg.sampling, pad_id=self.pad_id)
        keep = torch.cat([self.parity_tokens(r) for r in parity]) if parity else exact.bool()
        state.exact_lp = exact[keep]

    def parity_tokens(self, r: Rollout) -> torch.Tensor:
        """Per sampled token of `r`: sampled by the weights the trainer holds now, in a turn no
        update landed in (bool, aligned with `r.sampled_logprobs`)."""
        return torch.tensor(r.parity_mask(self.version), dtype=torch.bool)

    def has_parity_tokens(self, r: Rollout) -> bool:
        return any(r.parity_mask(self.version))

    def sampled_by_current(self, r: Rollout) -> bool:
        """Every token of `r` was sampled by the weights the trainer holds now: the engine routed
        its positions with these weights too (route disagreement is measured on these)."""
        return r.min_version == r.max_version == self.version

    def apply(self, state: "StepState") -> dict[str, float]:
        """Clip, take the optimizer step; returns the step's metrics (before the version bump)."""
        metrics = self._batch_metrics(state.rollouts)
        if "lp" in state.tokens:
            metrics |= self._metrics(state)
        grad_norm, applied = self._optimizer_step()
        if applied:
            metrics["rl/grad_norm"] = grad_norm
        metrics["rl/skipped_nonfinite"] = float(state.tokens.skipped_samples)
        metrics["rl/skipped_nonfinite_step"] = 0.0 if applied else 1.0
        fault = not applied
        if self.loss_scale is not None:
            metrics["rl/loss_scale"] = self.loss_scale.scale  # the scale this step's backward used
            # An overflow above the floor is the scaler's business: skipped, counted, scale halved.
            fault = self.loss_scale.update(applied)
            metrics["rl/overflow_steps"] = float(self.loss_scale.overflow_steps)
        self.nonfinite_streak = 0 if not fault else self.nonfinite_streak + 1
        return metrics

    @staticmethod
    def _batch_metrics(rollouts: list[Rollout]) -> dict[str, float]:
        """What the step's rollouts were, whether or not they went through the loss."""
        rewards = torch.tensor([r.reward for r in rollouts])
        return {
            "rl/reward_mean": rewards.mean().item(),
            **Trainer._reward_parts(rollouts),
            "rl/completion_len_mean": float(sum(r.num_tokens for r in rollouts) / len(rollouts)),
            "rl/samples": float(len(rollouts)),
            "rl/tokens_sampled": float(sum(r.num_tokens for r in rollouts)),
            "rl/zero_advantage_frac": sum(r.advantage == 0.0 for r in rollouts) / len(rollouts),
            "rl/truncated_frac": sum(map(is_truncated, rollouts)) / len(rollouts),
            **({"rl/overlong_penalty_mean": sum(r.meta["overlong_penalty"] for r in rollouts)
                / len(rollouts)} if "overlong_penalty" in rollouts[0].meta else {}),
            "lag/mixed_version_frac": sum(r.min_version != r.max_version for r in rollouts)
            / len(rollouts),
        }

    @staticmethod
    def _reward_parts(rollouts: list[Rollout]) -> dict[str, float]:
        """With learned rewards: the task's verified reward (measured even at weight 0) and each
        learned source's mean score."""
        if "verified_reward" not in rollouts[0].meta:
            return {}
        parts = {"reward/verified_mean": [r.meta["verified_reward"] for r in rollouts]}
        for name in rollouts[0].meta["learned_rewards"]:
            parts[f"reward/{name}_mean"] = [r.meta["learned_rewards"][name] for r in rollouts]
        return {key: sum(values) / len(values) for key, values in parts.items()}

    def _metrics(self, state: "StepState") -> dict[str, float]:
        s, rollouts, version = state.tokens, state.rollouts, state.version
        lp, lp_b, ratio = s["lp"], s["lp_b"], s["ratio"]
        d = lp - lp_b
        lag = version - s["versions"]
        on_policy = lag == 0
        m = {
            "rl/advantage_mean": s["adv"].mean().item(),
            "rl/ratio_mean": ratio.mean().item(),
            "rl/ratio_min": ratio.min().item(),
            "rl/ratio_max": ratio.max().item(),
            "rl/clip_frac": s["clipped"].mean().item(),
            # Over rollouts sampled entirely by the current weights (see the parity note below):
            # in parity this is exactly 0, whatever the loss.
            "rl/kl_k3": (d.double().exp() - 1 - d.double()).mean().item(),
            "rl/entropy": s["entropy"].mean().item(),
            "rl/logprob_mean": lp.mean().item(),
            "rl/loss": s["loss"].sum().item() / max(len(lp), 1),
            "rl/tokens": float(len(lp)),  # through forward and backward
            "lag/mean": lag.mean().item(),
            "lag/max": lag.max().item(),
            "lag/on_policy_token_frac": on_policy.float().mean().item(),
        }
        if s["pure"].any():
            m["rl/clip_frac_on_policy"] = s["clipped"][s["pure"].bool()].mean().item()
        if "kl_ref" in s:
            m["kl/ref_k3"] = s["kl_ref"].mean().item()
        if "is_weight" in s:
            w = s["is_weight"]
            m |= {"is/weight_mean": w.mean().item(), "is/weight_max": w.max().item()}
            m["is/truncated_frac"] = s["truncated"].mean().item() if "truncated" in s else 0.0
            m["is/masked_frac"] = s["masked"].mean().item() if "masked" in s else 0.0
        # Parity: tokens of rollouts sampled entirely by the weights the trainer holds now. A
        # token sampled after an in-flight update is not enough: its prompt and earlier tokens
        # sit in the KV cache as computed by the old weights.
        pure = s["pure"].bool()
        lp_parity = torch.cat([lp[pure], *state.probe_train])
        lp_engine = torch.cat([lp_b[pure], *state.probe_engine])
        outside = torch.cat([s["outside"].bool()[pure], *state.probe_outside])
        parity = mismatch_metrics(lp_parity, lp_engine, outside)
        # No parity tokens this step (all of it one step old, no probe): nothing to report.
        m |= {k: v for k, v in parity.items() if v == v}
        turns = torch.cat([s["turns"].long()[pure], *state.probe_turns])
        if any(r.turns is not None for r in rollouts) or bool((turns > 0).any()):
            m |= per_turn_mismatch(lp_parity, lp_engine, turns)
            m["rollouts/turns_mean"] = sum(r.num_turns for r in rollouts) / len(rollouts)
        m["mismatch/probe_tokens"] = float(sum(len(t) for t in state.probe_train))
        # Tokens scored for parity ÷ tokens sampled for this step.
        m["mismatch/coverage"] = len(lp_parity) / max(sum(r.num_tokens for r in rollouts), 1)
        routes = RouteCounts.total(
            ([RouteCounts(s["route_compared"], s["route_differ"])] if "route_compared" in s
             else []) + state.probe_routes)
        if routes is not None:
            m |= routes.metrics(self.cfg.parity.routes_per_layer)
        if state.recompute_lp is not None:  # the same tokens, the trainer's own routing
            own = mismatch_metrics(state.recompute_lp, lp_engine)
            m |= {f"routing/recompute_{k.split('/', 1)[1]}": own[k] for k in ROUTING_COMPARED}
        if state.exact_lp is not None:
            m |= precision_metrics(lp_parity, lp_engine, state.exact_lp, self.cfg.parity.tolerance)
        return m


@dataclass
class StepState:
    rollouts: list[Rollout]
    tokens: StepTokens
    version: int
    # The rollouts through forward and backward, in the order of `tokens` (trainer.accumulate).
    learned: list[Rollout] = field(default_factory=list)
    probe_train: list[torch.Tensor] = field(default_factory=list)
    probe_rollouts: list[Rollout] = field(default_factory=list)
    probe_engine: list[torch.Tensor] = field(default_factory=list)
    probe_outside: list[torch.Tensor] = field(default_factory=list)
    probe_turns: list[torch.Tensor] = field(default_factory=list)
    probe_routes: list = field(default_factory=list)  # RouteCounts of probe rollouts (MoE)
    exact_lp: torch.Tensor | None = None  # float64 logprobs of the parity tokens
    recompute_lp: torch.Tensor | None = None  # MoE replay: the same, by the trainer's own routes
    local_rollouts: int = 0  # rollouts this rank ran forward and backward on
    idle_passes: int = 0  # backward passes with nothing to add, to match a busier rank's

