"""Mixture-of-experts routes from the engine: which experts each token was sent to, per layer.

Runs in vLLM's worker process (engine/worker_extension.py). vLLM 0.32 captures routes only in its
GPU model runner (V2); the CPU runner, a V1 runner, never calls the capturer. So this recorder
binds itself to every MoE router with vLLM's own `bind_routed_experts_capturer` (the router calls
`capture(layer, topk_ids)` for the rows of the current forward) and wraps the runner's
`_model_forward`: after each forward it knows which rows belonged to which request (the runner's
`input_batch.req_ids` and `query_start_loc`, the layout the forward just ran) and at which
positions (the forward's `positions`). Each request's rows are kept by position until the engine
takes them (`take`) when the request has finished.

A route array is int16 [positions, layers, top_k]: -1 where nothing was captured (a layer without
experts; the last sampled token, which the engine never runs; a prefix-cache hit).
"""

from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np
import torch

NOT_CAPTURED = -1
# Requests whose routes nobody took (aborted ones) are dropped beyond this many.
MAX_PENDING_REQUESTS = 4096


class RouteRecorder:
    def __init__(self, runner, num_layers: int, top_k: int) -> None:
        self.runner = runner
        self.num_layers, self.top_k = num_layers, top_k
        self._step: dict[int, torch.Tensor] = {}  # layer → topk ids of the current forward's rows
        # request id (vLLM's internal one) → chunks of (positions, rows) in the order computed
        self._pending: OrderedDict[str, list[tuple[np.ndarray, np.ndarray]]] = OrderedDict()

    # Called by each MoE router inside the forward (vLLM's capturer protocol).
    def capture(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        self._step[layer_id] = topk_ids.detach().to("cpu", torch.int16, copy=True)

    def wrap_forward(self, forward):
        def recorded(*args, **kwargs):
            self._step.clear()
            out = forward(*args, **kwargs)
            positions = kwargs["positions"] if "positions" in kwargs else args[1]
            self._attribute(positions)
            return out

        return recorded

    def _attribute(self, positions: torch.Tensor) -> None:
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        bounds = self.runner.query_start_loc.np[: num_reqs + 1]
        rows = int(bounds[-1])  # the forward may run padding rows after the requests' own
        routes = np.full((rows, self.num_layers, self.top_k), NOT_CAPTURED, dtype=np.int16)
        for layer, ids in self._step.items():
            routes[:, layer] = ids[:rows].numpy()
        # A copy: on CPU `positions` is the runner's persistent buffer, rewritten every step.
        at = positions[:rows].cpu().numpy().copy()
        for i, request in enumerate(batch.req_ids[:num_reqs]):
            a, b = int(bounds[i]), int(bounds[i + 1])
            self._pending.setdefault(request, []).append((at[a:b], routes[a:b]))
        while len(self._pending) > MAX_PENDING_REQUESTS:
            self._pending.popitem(last=False)

    def take(self, request_id: str) -> list[tuple[int, list[int], bytes]]:
        """The routes of every finished request made for the client's `request_id` (one per
        sample: vLLM names the j-th of n samples `j_<id>-<suffix>`, a single one `<id>-<suffix>`),
        as (sample index, shape, int16 bytes); forgotten here afterwards. Bytes, since vLLM's
        utility-call encoding turns arrays and tensors into nested lists (`decode_routes`)."""
        pattern = re.compile(rf"^(?:(\d+)_)?{re.escape(request_id)}-[0-9a-zA-Z]+$")
        out = []
        for internal in [r for r in self._pending if pattern.match(r)]:
            index = int(pattern.match(internal).group(1) or 0)
            routes = self._assemble(self._pending.pop(internal))
            out.append((index, list(routes.shape), routes.tobytes()))
        return out

    def _assemble(self, chunks) -> np.ndarray:
        length = max(int(p.max()) + 1 for p, _ in chunks if len(p))
        routes = np.full((length, self.num_layers, self.top_k), NOT_CAPTURED, dtype=np.int16)
        for positions, rows in chunks:  # a later computation of a position (preemption) wins
            routes[positions] = rows
        return routes


def full_length_routes(routes, rollout):
    """Routes [positions, layers, top_k] covering the rollout's prompt and completion: the last
    sampled token was never run by the engine (nor anything past a stop), so it has none."""
    length = len(rollout.prompt_ids) + len(rollout.completion_ids)
    full = np.full((length, *routes.shape[1:]), NOT_CAPTURED, dtype=routes.dtype)
    full[: min(length, len(routes))] = routes[:length]
    return full


def decode_routes(taken: list) -> dict[int, np.ndarray]:
    """`RouteRecorder.take`'s answer as arrays by sample index."""
    return {int(index): np.frombuffer(raw, dtype=np.int16).reshape(shape).copy()
            for index, shape, raw in taken}


def start_recording(worker) -> dict:
    """Bind a RouteRecorder to the worker's model; returns what it records (or why not)."""
    from vllm.model_executor.layers.fused_moe.routed_experts_capturer import (
        bind_routed_experts_capturer,
    )

    runner = worker.model_runner
    config = runner.vllm_config.model_config
    if config.get_num_experts() <= 0:
        return {"routes_captured": False}
    if int(runner.vllm_config.compilation_config.mode) != 0:
        # Measured (the doctor's vllm-defaults rung on a tiny Qwen3-MoE): inside vLLM's compiled
        # graph the routers' capture calls never run, and every route would read "none".
        return {"routes_captured": False,
                "routes_not_captured": "the engine runs a compiled graph; set "
                                       "engine.enforce_eager: true to record routes"}
    recorder = RouteRecorder(runner, config.get_total_num_hidden_layers(),
                             config.get_num_experts_per_tok())
    bind_routed_experts_capturer(runner.get_model(), recorder)
    runner._model_forward = recorder.wrap_forward(runner._model_forward)
    worker._parityrl_routes = recorder
    return {"routes_captured": True, "route_layers": recorder.num_layers,
            "route_top_k": recorder.top_k}
