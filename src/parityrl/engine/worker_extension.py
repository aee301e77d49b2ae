"""Runs inside vLLM's worker process (vLLM mixes it into its Worker class).

Loaded by name through `worker_extension_cls`, called through `collective_rpc`. It loads a
safetensors file written by the trainer into the live model with vLLM's in-place reloader; plain
`model.load_weights` does not work on the CPU backend, which repacks linear weights after loading.
Importing it registers parityrl's gloo weight-transfer backend (weights/gloo.py): vLLM imports
this module in the worker before it loads the model and creates the transfer engine.
"""

from __future__ import annotations

import time

from parityrl.engine.routes import start_recording
from parityrl.kernels import pad_single_row_gemms
from parityrl.weights import gloo
from parityrl.weights.digest import tensor_digest
from parityrl.weights.shm_file import MappedUpdateFile

gloo.register()


class WeightSyncExtension:
    def parityrl_load_weights(self, path: str) -> dict:
        """Reload every tensor in `path` in place; return digests of what was handed to vLLM."""
        start = time.perf_counter()
        if getattr(self, "_parityrl_update_file", None) is None:
            self._parityrl_update_file = MappedUpdateFile()  # kept mapped between updates
        digests: dict[str, str] = {}
        digest_seconds = 0.0

        def tensors():
            nonlocal digest_seconds
            for name, tensor in self._parityrl_update_file.tensors(path):
                t0 = time.perf_counter()
                digests[name] = tensor_digest(tensor)
                digest_seconds += time.perf_counter() - t0
                yield name, tensor

        model = self.model_runner.get_model()
        self.model_runner.reload_weights(weights_iterator=tensors())
        refreshed = self._parityrl_after_reload()
        # The trainer rewrites the shared file on the next update while this engine generates:
        # a parameter that kept a view of it instead of copying would change under the engine.
        aliased = self._parityrl_update_file.aliased(model.parameters())
        if aliased:
            raise RuntimeError(f"{len(aliased)} engine parameters alias the update file")
        return {"digests": digests, "load_seconds": time.perf_counter() - start,
                "digest_seconds": digest_seconds, "refreshed_tied_modules": refreshed}

    def parityrl_finish_transfer(self) -> dict:
        """After vLLM's `finish_weight_update` (gloo transport): what the reload left to do, and
        the digests of what the transfer engine handed to vLLM."""
        engine = self.weight_transfer_engine
        refreshed = self._parityrl_after_reload()
        return {"digests": dict(engine.digests), "digest_seconds": engine.digest_seconds,
                "refreshed_tied_modules": refreshed}

    def _parityrl_after_reload(self) -> list[str]:
        model = self.model_runner.get_model()
        refreshed = _refresh_tied_modules(model) + _repack_cpu_experts(model)
        if getattr(self, "_parityrl_pad_gemms", False):  # the reload rebuilt every GEMM
            pad_single_row_gemms(model)
        return refreshed

    def parityrl_load_adapter(self, name: str, lora_id: int, path: str) -> dict:
        """vLLM's own worker `add_lora` with `load_inplace` (what AsyncLLM.add_lora reaches
        through the engine core), then the slot digests: one round trip instead of two while
        generation is paused. (A LoRARequest does not survive the RPC's serialisation: its
        fields do.)"""
        from vllm.lora.request import LoRARequest

        start = time.perf_counter()
        self.add_lora(LoRARequest(name, lora_id, path, load_inplace=True))
        lora_request = LoRARequest(name, lora_id, path)
        digest_start = time.perf_counter()
        result = self.parityrl_adapter_digests(lora_request.lora_int_id)
        end = time.perf_counter()
        return result | {"load_seconds": end - start, "digest_seconds": end - digest_start}

    def parityrl_adapter_digests(self, lora_id: int) -> dict:
        """Digests of what adapter `lora_id`'s slot holds in every LoRA layer, by the PEFT name of
        the trainer's tensor it came from (a packed layer's slices named after their modules, by
        the model's `packed_modules_mapping`); `nonzero`: the names whose slot is not all zero.
        vLLM's own weight checksums do not cover adapter slots."""
        manager = self.model_runner.lora_manager._adapter_manager
        if lora_id not in manager.lora_index_to_id:
            return {"digests": {}, "nonzero": [], "active": False}
        index = manager.lora_index_to_id.index(lora_id)
        packed = manager.packed_modules_mapping
        digests, nonzero = {}, []
        for name, module in manager.modules.items():
            stacked_a = getattr(module, "lora_a_stacked", None)
            if not isinstance(stacked_a, tuple):
                continue
            parent, _, leaf = name.rpartition(".")
            parts = packed.get(leaf, [leaf]) if len(stacked_a) > 1 else [leaf]
            for part, a, b in zip(parts, stacked_a, module.lora_b_stacked):
                for kind, slot in (("lora_A", a[index, 0]), ("lora_B", b[index, 0])):
                    key = f"{parent}.{part}.{kind}.weight"
                    digests[key] = tensor_digest(slot)
                    if bool(slot.any()):
                        nonzero.append(key)
        return {"digests": digests, "nonzero": nonzero, "active": True}

    def parityrl_pad_single_row_gemms(self, on: bool = True) -> int:
        """From now on (reloads included) every CPU GEMM runs a one-row input as two rows; or,
        with `on=False`, as it comes again. Returns the GEMMs changed."""
        self._parityrl_pad_gemms = on
        return pad_single_row_gemms(self.model_runner.get_model(), on)

    def parityrl_record_routes(self) -> dict:
        """Record the experts every token is routed to from now on (engine/routes.py)."""
        return start_recording(self)

    def parityrl_take_routes(self, request_id: str) -> list:
        """The routes of request `request_id`'s finished samples: (sample index, routes)."""
        return self._parityrl_routes.take(request_id)

    def parityrl_numerics(self) -> dict:
        """What this worker computes with, read here (not what was asked for)."""
        import torch
        from vllm import envs

        experts = [e for _, _, e in _moe_layers(self.model_runner.get_model())]
        return {"cpu_attn_split_kv": bool(envs.VLLM_CPU_ATTN_SPLIT_KV),
                "worker_threads": torch.get_num_threads(),
                "single_row_gemm_padded": bool(getattr(self, "_parityrl_pad_gemms", False)),
                **({"moe_experts": type(experts[0]).__name__,
                    "moe_experts_isa": getattr(experts[0], "isa", None)} if experts else {})}


def _repack_cpu_experts(model) -> list[str]:
    """Re-run the CPU mixture-of-experts prepack after an in-place reload.

    At load, vLLM's CPU experts (fused_moe/experts/cpu_moe.py) repack each MoE layer's w13/w2
    into their grouped-GEMM layout; vLLM 0.32's in-place reload loads the new weights and leaves
    them in checkpoint layout, which the kernel then reads as packed. Found by the doctor's
    weight-sync rung on a tiny Qwen3-MoE: reloading the very same weights moved the engine's
    logprobs by up to 2.2 nats (the layer's position-weighted checksum after the reload was the
    checkpoint layout's).
    """
    repacked = []
    for name, module, experts in _moe_layers(model):
        if type(experts).__name__.endswith("CPUUnquantizedExperts"):
            experts.process_weights_after_loading(module)
            repacked.append(name)
    return repacked


def _moe_layers(model) -> list:
    """(name, module, fused-experts kernel object) of every MoE layer of the engine's model."""
    found = []
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
        if experts is not None:
            found.append((name, module, experts))
    return found


def _refresh_tied_modules(model) -> list[str]:
    """Re-derive kernel state of modules that share their weight with another module.

    With tied embeddings the lm_head holds the embedding's Parameter; on the CPU backend each of
    the two modules also keeps its own packed copy for the matmul (built once after loading).
    vLLM's in-place reload rebuilds the copy of the module the checkpoint tensor was loaded into
    (the embedding) and puts the old state back on the other, so the logits would keep coming from
    the old embedding. Found by the doctor's weight-sync rung on a tied tiny model.
    """
    owners: dict[int, list[tuple[str, object]]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None and hasattr(module, "quant_method"):
            owners.setdefault(id(weight), []).append((name, module))
    refreshed = []
    for group in owners.values():
        if len(group) < 2:
            continue
        for name, module in group:
            method = module.quant_method
            if type(method).__name__ == "UnquantizedEmbeddingMethod":
                method.process_weights_after_loading(module)
                refreshed.append(name)
    return refreshed

