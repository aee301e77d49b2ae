"""Runs inside vLLM's worker process (vLLM mixes it into its Worker class).

Loaded by name through `worker_extension_cls`, called through `collective_rpc`. It loads a
safetensors file written by the trainer into the live model with vLLM's in-place reloader; plain
`model.load_weights` does not work on the CPU backend, which repacks linear weights after loading.
"""

from __future__ import annotations

import time


class WeightSyncExtension:
    def parityrl_load_weights(self, path: str) -> dict:
        """Reload every tensor in `path` in place; return digests of what was handed to vLLM."""
        from parityrl.weights.digest import tensor_digest
        from parityrl.weights.transfer import MappedUpdateFile

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
        refreshed = _refresh_tied_modules(model)
        # The trainer rewrites the shared file on the next update while this engine generates:
        # a parameter that kept a view of it instead of copying would change under the engine.
        aliased = self._parityrl_update_file.aliased(model.parameters())
        if aliased:
            raise RuntimeError(f"{len(aliased)} engine parameters alias the update file")
        return {"digests": digests, "load_seconds": time.perf_counter() - start,
                "digest_seconds": digest_seconds, "refreshed_tied_modules": refreshed}


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

