"""Mixture-of-experts routing in the trainer's forward: compared with the engine's, or replayed.

A router picks each token's top-k experts from its logits; a rounding difference between engine
and trainer can flip a pick, and then the token goes through other experts on each side (Rollout
Routing Replay, arXiv 2510.11370). With the engine's routes (`Rollout.routes`, engine/routes.py):

- `recompute`: the trainer routes by its own router; the share of (position, layer) pairs whose
  expert set differs from the engine's is counted (`mismatch/route_disagreement`).
- `replay`: each captured position goes to the experts the engine chose, with gate weights from
  the trainer's own router probabilities over those experts (renormalised as the model's router
  does), so the router still gets a gradient. Disagreement is counted the same way, against the
  trainer's own top-k.

Routers are found by what transformers' softmax-top-k routers (Qwen3-MoE, Qwen2-MoE, OLMoE,
Mixtral) return: (logits, top-k weights, top-k indices) for flattened tokens. The hook runs on
each router's output, so the rest of the model is the model's own code.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from parityrl.core.errors import UserError

# The mismatch metrics also reported with the trainer's own routing (routing/recompute_*) where
# the engine's routes are replayed: the doctor's routing rung and parity.compare_routing.
ROUTING_COMPARED = ("mismatch/mean_abs_diff", "mismatch/max_abs_diff", "mismatch/kl_k3")


def moe_routers(model) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router module) of every sparse layer of `model`."""
    decoder = model.get_decoder()
    routers = []
    for index, layer in enumerate(getattr(decoder, "layers", [])):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and hasattr(gate, "top_k") and hasattr(gate, "num_experts"):
            routers.append((index, gate))
    return routers


def is_moe(model) -> bool:
    return bool(moe_routers(model))


@dataclass
class RouteCounts:
    """Per batch row and decoder layer [B, layers]: positions compared with the engine's routes,
    and those whose expert set differed (zero in dense layers)."""

    compared: torch.Tensor
    differ: torch.Tensor

    def row(self, i: int) -> "RouteCounts":
        return RouteCounts(self.compared[i:i + 1], self.differ[i:i + 1])

    @staticmethod
    def total(parts: list["RouteCounts"]) -> "RouteCounts | None":
        if not parts:
            return None
        return RouteCounts(torch.cat([p.compared for p in parts]),
                           torch.cat([p.differ for p in parts]))

    def metrics(self, per_layer: bool = False) -> dict[str, float]:
        """`mismatch/route_disagreement` (and per layer with experts, on request)."""
        compared, differ = self.compared.sum(0), self.differ.sum(0)
        if not int(compared.sum()):
            return {}
        m = {"mismatch/route_disagreement": float(differ.sum() / compared.sum()),
             "mismatch/route_positions": float(compared.max())}
        if per_layer:
            for layer in compared.nonzero().flatten().tolist():
                m[f"mismatch/route_disagreement/layer{layer}"] = float(
                    differ[layer] / compared[layer])
        return m


def compare_routes(own: torch.Tensor, engine: torch.Tensor):
    """Per row of [N, top_k] expert ids: (the engine's row was captured, the two expert sets
    differ there)."""
    captured = (engine >= 0).all(-1)
    same = (own.sort(-1).values == engine.to(own.dtype).sort(-1).values).all(-1)
    return captured, captured & ~same


@contextmanager
def engine_routing(model, routes: torch.Tensor | None, attention_mask: torch.Tensor,
                   replay: bool):
    """Within the block, every forward of `model` over a batch shaped like `attention_mask`
    compares its routing with `routes` ([B, T, layers, top_k], -1 = not captured) and, with
    `replay`, routes captured positions as the engine did. Yields a list that receives one
    RouteCounts per forward (empty without routes)."""
    counts: list[RouteCounts] = []
    if routes is None:
        if replay and is_moe(model):
            raise UserError("trainer.moe_routing=replay needs the engine's routes: the rollouts "
                            "carry none (engine.record_routes is off, or the engine is not MoE)")
        yield counts
        return
    routers = moe_routers(model)
    if not routers:
        raise UserError("the rollouts carry expert routes but the trainer's model has no "
                        "mixture-of-experts router this code recognises")
    B, T = attention_mask.shape
    valid = attention_mask.bool().reshape(-1)
    layers = routes.shape[2]
    pending = RouteCounts(torch.zeros(B, layers, dtype=torch.long),
                          torch.zeros(B, layers, dtype=torch.long))
    handles = []

    def hook(layer_index):
        def on_output(module, args, output):
            logits, weights, indices = output
            engine = routes[:, :, layer_index].reshape(B * T, -1).to(indices.device)
            captured, differ = compare_routes(indices, engine)
            captured &= valid.to(indices.device)
            differ &= captured
            pending.compared[:, layer_index] = captured.view(B, T).sum(-1).cpu()
            pending.differ[:, layer_index] = differ.view(B, T).sum(-1).cpu()
            if not replay or not captured.any():
                return output
            chosen = torch.where(captured.unsqueeze(-1), engine.to(indices.dtype), indices)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            picked = probs.gather(-1, chosen)
            if getattr(module, "norm_topk_prob", True):
                picked = picked / picked.sum(-1, keepdim=True)
            replayed = torch.where(captured.unsqueeze(-1), picked.to(weights.dtype), weights)
            return logits, replayed, chosen
        return on_output

    for index, router in routers:
        handles.append(router.register_forward_hook(hook(index)))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
        counts.append(pending)


def routes_tensor(rollout_routes: list, shape: tuple[int, int]) -> torch.Tensor | None:
    """The batch's routes [B, T, layers, top_k] from each rollout's (numpy [positions, layers,
    top_k] or None; -1 where missing), or None when no rollout has any."""
    present = [r for r in rollout_routes if r is not None]
    if not present:
        return None
    B, T = shape
    out = torch.full((B, T, *present[0].shape[1:]), -1, dtype=torch.int16)
    for i, r in enumerate(rollout_routes):
        if r is not None:
            out[i, : len(r)] = torch.from_numpy(r[:T])
    return out
