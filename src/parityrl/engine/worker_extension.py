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
        from safetensors import safe_open

        from parityrl.weights.digest import tensor_digest

        digests: dict[str, str] = {}

        def tensors():
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    digests[name] = tensor_digest(tensor)
                    yield name, tensor

        start = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=tensors())
        return {"digests": digests, "load_seconds": time.perf_counter() - start}
