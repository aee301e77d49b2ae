"""The engine's forward pass on the trainer's weights: bitwise mode (`parity.mode: bitwise`).

Two float32 implementations of one model agree only to their rounding error (issue 3). The one way
to *equal* logprobs is for the trainer to run the engine's own kernels, laid out as the engine ran
them. This module does that for Llama/Qwen2-type models and Qwen3-MoE (per-head q/k RMSNorm
before rope; each sparse layer as `_EngineExperts`) on vLLM's CPU backend (0.32, eager):

    embedding ─► per layer: native RMSNorm (+ residual) ─► fused qkv GEMM (vLLM's CPU GEMM
    dispatch: oneDNN) ─► `_C.rotary_embedding` ─► K/V written to a paged cache
    (`cpu_attn_reshape_and_cache`) ─► `cpu_attention_with_kv_cache`: the prompt as one prefill
    request, then every completion position as its own one-token decode request over the same
    blocks ─► o GEMM ─► RMSNorm ─► fused gate/up GEMM ─► silu·mul ─► down GEMM
    ─► final RMSNorm ─► lm_head GEMM (vocab padded to 64 as vLLM pads it) ─► vLLM's own
    temperature and top-k/top-p functions ─► log_softmax

Why each choice holds (measured on this machine kind, single engine thread): the oneDNN GEMM gives a
row the same bits for every batch size M >= 2 (and M = 1 too when K <= 1024), RMSNorm / silu·mul /
log_softmax are per row, and a request's attention output does not depend on the other requests in
its batch once the split-KV decode path is off (`VLLM_CPU_ATTN_SPLIT_KV=0`). So the trainer can
batch every position of every rollout into one pass per layer and still reproduce each engine step.

No autograd here: `token_logprobs` takes the values from this pass and the gradient from the
ordinary PyTorch forward (straight-through: value `exact + (x - x.detach())`), so learning follows
the default trainer's gradient at the same weights while every reported logprob is the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parityrl.core.errors import UserError
from parityrl.core.sampling import SamplingConfig
from parityrl.kernels import pad_single_row
from parityrl.trainer.lora import lora_settings
from parityrl.weights.lora_folder import engine_slots

SUPPORTED_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3MoeForCausalLM")
VOCAB_PADDING = 64  # vllm/model_executor/layers/vocab_parallel_embedding.py DEFAULT_VOCAB_PADDING_SIZE


def check_bitwise_supported(model) -> None:
    """One-line refusal for what bitwise mode has not been audited for."""
    config = model.config
    arch = (config.architectures or [type(model).__name__])[0]
    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"parity.mode=bitwise supports {', '.join(SUPPORTED_ARCHS)}; "
                        f"the model is {arch}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise UserError(f"parity.mode=bitwise needs float32 weights (audited in float32 only); "
                        f"the model is {str(dtype).removeprefix('torch.')}")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"parity.mode=bitwise does not reproduce rope type {rope['rope_type']!r}")
    if getattr(config, "use_sliding_window", False):
        raise UserError("parity.mode=bitwise does not reproduce sliding-window attention")
    if next(model.parameters()).device.type != "cpu":
        raise UserError("parity.mode=bitwise runs vLLM's CPU kernels: the trainer must be on CPU")


@dataclass
class _LoRASlice:
    """One slice of a (fused) linear's adapter as the engine's slot holds it: A [1, 1, r, in] and
    the scaled B [1, 1, size, r], at columns [offset, offset + size) of the output."""

    a: torch.Tensor
    b: torch.Tensor
    offset: int
    size: int


class _EngineLinear:
    """One linear layer as vLLM's CPU backend runs it, from the same (fused) weight; with
    `lora`, plus the adapter as vLLM's CPU LoRA layer adds it (vllm/lora/layers/base_linear.py
    then punica_cpu.py `add_lora_linear`): every slice's x·Aᵀ into a float32 buffer first, then
    each buffer times its B added to the slice's columns, by vLLM's own torch ops."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 lora: list[_LoRASlice] | None = None) -> None:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        self.layer = torch.nn.Module()
        self.layer.weight = torch.nn.Parameter(weight.detach().contiguous().clone(), requires_grad=False)
        self.bias = None if bias is None else bias.detach().contiguous().clone()
        dispatch_cpu_unquantized_gemm(self.layer, remove_weight=False)
        # The engine pads one-row GEMMs in bitwise mode; a one-row pass here must do the same.
        self.linear = pad_single_row(self.layer.cpu_linear)
        self.lora = lora

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x, self.layer.weight, self.bias)
        if self.lora:
            from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

            slot = torch.zeros(x.shape[0], dtype=torch.long)  # every row: the one adapter slot
            buffers = [torch.zeros(x.shape[0], s.a.shape[2], dtype=torch.float32)
                       for s in self.lora]
            for buffer, s in zip(buffers, self.lora):
                bgmv_shrink(x, s.a, buffer, slot, 1.0)
            for buffer, s in zip(buffers, self.lora):
                bgmv_expand_slice(buffer, s.b, out, slot, s.offset, s.size, add_inputs=True)
        return out


def one_row_gemm_differs(in_features: int, out_features: int, threads: int | None = None,
                         seed: int = 0) -> bool:
    """A fact of this CPU: does vLLM's CPU GEMM give a row other bits on its own (M = 1) than in a
    batch (M = 2)? True for K >= 1280 on an AVX-512 Xeon (oneDNN's M = 1 kernel), false with the
    AVX2 paths (measured there: the engine's padding has nothing to fix). `threads`: the engine
    worker's thread count (the kernel may depend on it)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    x = torch.randn(1, in_features, generator=gen)
    linear = _EngineLinear(weight, None)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        alone = linear.layer.cpu_linear(x, linear.layer.weight, None)
        batched = linear.layer.cpu_linear(x.expand(2, -1).contiguous(), linear.layer.weight, None)
    finally:
        torch.set_num_threads(previous)
    return not torch.equal(alone[0], batched[0])


def _weight_of(norm) -> torch.Tensor | None:
    return None if norm is None else norm.weight.detach().clone()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from vllm.ir.ops.layernorm import rms_norm

    return rms_norm.impls["native"].impl_fn(x, weight, eps)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    from vllm.ir.ops.layernorm import fused_add_rms_norm

    return fused_add_rms_norm.impls["native"].impl_fn(x, residual, weight, eps)


class _EngineExperts:
    """A mixture-of-experts layer as vLLM's CPU backend runs it (fused_moe/router/cpu_router.py,
    experts/cpu_moe.py): the router GEMM through the same CPU GEMM dispatch as every linear,
    top-k over the router logits with the weights a softmax over the picked logits (vLLM's
    `_softmax_topk`), then the grouped-GEMM kernel `cpu_fused_moe` on expert weights padded and
    prepacked for the engine's instruction set (`isa`, read from the engine's worker)."""

    def __init__(self, block, isa: str) -> None:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
            CPUUnquantizedExperts,
            X86CPUUnquantizedExperts,
        )

        experts_class = {"vec": CPUUnquantizedExperts, "amx": X86CPUUnquantizedExperts}.get(isa)
        if experts_class is None:
            raise UserError(f"bitwise mode reproduces vLLM's CPU MoE experts with isa vec or "
                            f"amx; the engine runs {isa!r}")
        gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
        experts, inner, hidden = gate_up.shape[0], gate_up.shape[1] // 2, gate_up.shape[2]
        align = experts_class._intermediate_alignment()
        padded = -(-inner // align) * align  # zero-padded as `_pad_moe_intermediate` pads
        w13 = gate_up.new_zeros(experts, 2 * padded, hidden)
        w13[:, :inner], w13[:, padded:padded + inner] = gate_up[:, :inner], gate_up[:, inner:]
        w2 = down.new_zeros(experts, hidden, padded)
        w2[:, :, :inner] = down
        self.w13 = ops.cpu_prepack_moe_weight(w13.contiguous(), isa)
        self.w2 = ops.cpu_prepack_moe_weight(w2.contiguous(), isa)
        self.router = _EngineLinear(block.gate.weight, None)
        self.top_k, self.renormalize = block.gate.top_k, bool(block.gate.norm_topk_prob)
        self.isa = isa

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.fused_moe.router.cpu_router import _softmax_topk

        weights, ids = _softmax_topk(self.router(x), self.top_k, self.renormalize)
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, self.w13, self.w2, None, None, weights, ids, "silu", self.isa)
        return out, ids


@dataclass
class _Layer:
    qkv: _EngineLinear
    o: _EngineLinear
    gate_up: _EngineLinear | None  # dense MLP, or
    down: _EngineLinear | None
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    experts: _EngineExperts | None = None  # a mixture-of-experts layer
    q_norm: torch.Tensor | None = None  # Qwen3: RMSNorm of each head's q and k before rope
    k_norm: torch.Tensor | None = None


@dataclass
class Sequence:
    """One rollout as the engine saw it: prefill of `prompt`, then one decode step per token."""

    prompt: list[int]
    completion: list[int]


class EngineKernels:
    """The engine's forward on a transformers model's weights. The GEMM handlers hold fused
    copies of the weights: they are re-packed whenever a parameter changed in place since the
    last pack (an optimizer step, a checkpoint load), once per change."""

    def __init__(self, model, block_size: int = 128, max_lora_rank: int | None = None,
                 moe_isa: str | None = None) -> None:
        check_bitwise_supported(model)
        self.model = model
        self.block_size = block_size
        # A LoRA model: the engine's slots are padded to its max_lora_rank, and so are ours.
        self.lora = lora_settings(model)
        if self.lora is not None and not max_lora_rank:
            raise UserError("bitwise mode with a LoRA adapter needs an engine started with LoRA")
        self.max_lora_rank = max_lora_rank
        self.moe_isa = moe_isa  # the engine's MoE experts' instruction set (MoE models)
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.eps = cfg.rms_norm_eps
        self.vocab = cfg.vocab_size
        self.cos_sin_cache = _rope_cache(self.head_dim, cfg)
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.isa = _get_attn_isa(torch.float32, block_size, self.head_dim, "auto")
        self.layers: list[_Layer] = []
        self.routes: torch.Tensor | None = None  # the last pass's expert picks (MoE)
        self.pack()

    @classmethod
    def for_engine(cls, model, resolved: dict, current: "EngineKernels | None" = None
                   ) -> "EngineKernels":
        """Kernels laid out as the engine `resolved` (RolloutEngine.resolved_settings) runs:
        `current` when it already matches (block size, LoRA slot rank), else new ones."""
        block_size = resolved["block_size"]
        lora_rank = (resolved.get("lora") or {}).get("max_lora_rank")
        moe_isa = resolved.get("moe_experts_isa")
        if (current is not None and current.block_size == block_size
                and current.max_lora_rank == lora_rank and current.moe_isa == moe_isa):
            return current
        return cls(model, block_size, lora_rank, moe_isa)

    def _fingerprint(self) -> tuple:
        # Every in-place write bumps a tensor's version counter (optimizer step, copy_, load).
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    @torch.no_grad()
    def pack(self) -> None:
        self._packed = self._fingerprint()
        decoder = self.model.get_decoder()
        self.layers = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            qkv_b = None
            if attn.q_proj.bias is not None:
                qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            sparse = hasattr(mlp, "experts")
            if sparse and self.moe_isa is None:
                raise UserError("bitwise mode on a mixture-of-experts model needs the engine's "
                                "MoE instruction set (moe_experts_isa, read from its worker)")
            self.layers.append(_Layer(
                qkv=_EngineLinear(qkv_w, qkv_b,
                                  self._adapter([attn.q_proj, attn.k_proj, attn.v_proj])),
                o=_EngineLinear(attn.o_proj.weight, attn.o_proj.bias, self._adapter([attn.o_proj])),
                gate_up=None if sparse else _EngineLinear(
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    None if mlp.gate_proj.bias is None else
                    torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]),
                    self._adapter([mlp.gate_proj, mlp.up_proj])),
                down=None if sparse else _EngineLinear(mlp.down_proj.weight, mlp.down_proj.bias,
                                                       self._adapter([mlp.down_proj])),
                input_norm=layer.input_layernorm.weight.detach().clone(),
                post_norm=layer.post_attention_layernorm.weight.detach().clone(),
                experts=_EngineExperts(mlp, self.moe_isa) if sparse else None,
                q_norm=_weight_of(getattr(attn, "q_norm", None)),
                k_norm=_weight_of(getattr(attn, "k_norm", None)),
            ))
        self.embed = decoder.embed_tokens.weight.detach().clone()
        self.final_norm = decoder.norm.weight.detach().clone()
        head = self.model.get_output_embeddings().weight.detach()
        padded = -(-head.shape[0] // VOCAB_PADDING) * VOCAB_PADDING
        self.head = _EngineLinear(torch.nn.functional.pad(head, (0, 0, 0, padded - head.shape[0])),
                                  None)

    def _adapter(self, linears: list) -> list[_LoRASlice] | None:
        """The engine's adapter slots for the fused linear made of `linears` (trainer/lora.py
        `engine_slots`); a linear without an adapter has zero slots, as vLLM gives every LoRA
        layer. None when the model has no adapter."""
        if self.lora is None:
            return None
        slices, offset = [], 0
        for linear in linears:
            out, r = linear.out_features, self.max_lora_rank
            if hasattr(linear, "lora_A"):
                slots = engine_slots({"m.lora_A.weight": linear.lora_A.weight,
                                      "m.lora_B.weight": linear.lora_B.weight},
                                     self.lora, torch.float32, r)
                a, b = slots["m.lora_A.weight"], slots["m.lora_B.weight"]
            else:
                a, b = torch.zeros(r, linear.in_features), torch.zeros(out, r)
            slices.append(_LoRASlice(a.view(1, 1, *a.shape), b.view(1, 1, *b.shape), offset, out))
            offset += out
        return slices

    @torch.no_grad()
    def logits(self, sequences: list[Sequence]) -> torch.Tensor:
        """Engine logits [sum of completion lengths, vocab] (float32) at every completion token."""
        from vllm import _custom_ops as ops

        if self._fingerprint() != self._packed:
            self.pack()
        layout = _Layout(sequences, self.block_size)
        hidden = self.embed[layout.input_ids]
        residual = None
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        blocks = layout.num_blocks
        # MoE: the experts each row went to, per layer (-1 in dense layers), for the caller to
        # compare with the engine's routes.
        top_k = max((l.experts.top_k for l in self.layers if l.experts), default=0)
        self.routes = (torch.full((len(layout.input_ids), len(self.layers), top_k), -1,
                                  dtype=torch.int32) if top_k else None)
        for index, layer in enumerate(self.layers):
            if residual is None:
                residual, hidden = hidden, _rms_norm(hidden, layer.input_norm, self.eps)
            else:
                hidden, residual = _add_rms_norm(hidden, residual, layer.input_norm, self.eps)
            qkv = layer.qkv(hidden)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            if layer.q_norm is not None:  # per head, on views of the fused output, as vLLM does
                q = _rms_norm(q.view(-1, self.num_heads, self.head_dim), layer.q_norm,
                              self.eps).view(q.shape)
                k = _rms_norm(k.view(-1, self.num_kv_heads, self.head_dim), layer.k_norm,
                              self.eps).view(k.shape)
            ops.rotary_embedding(layout.positions, q, k, self.head_dim, self.cos_sin_cache, True)
            cache = torch.zeros(blocks, self.num_kv_heads, self.block_size, 2 * self.head_dim)
            key_cache, value_cache = cache.view(
                blocks, self.num_kv_heads, 2 * self.block_size, self.head_dim).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(
                k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim),
                key_cache, value_cache, layout.slot_mapping, self.isa)
            query = q.reshape(-1, self.num_heads, self.head_dim)
            out = torch.empty_like(query)
            for rows, batch in layout.attention_batches:
                part = torch.empty(len(rows), self.num_heads, self.head_dim)
                self._attend(query[rows].contiguous(), key_cache, value_cache, part, batch)
                out[rows] = part
            hidden = layer.o(out.view(-1, q_size))
            hidden, residual = _add_rms_norm(hidden, residual, layer.post_norm, self.eps)
            if layer.experts is not None:
                hidden, picked = layer.experts(hidden)
                self.routes[:, index] = picked
                continue
            gate_up = layer.gate_up(hidden)
            d = gate_up.shape[-1] // 2
            hidden = layer.down(torch.nn.functional.silu(gate_up[..., :d]) * gate_up[..., d:])
        hidden, _ = _add_rms_norm(hidden, residual, self.final_norm, self.eps)
        return self.head(hidden[layout.scored_rows].contiguous())[:, :self.vocab]

    def _attend(self, query, key_cache, value_cache, out, batch: "_AttentionBatch") -> None:
        from vllm import _custom_ops as ops

        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=batch.num_reqs, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=batch.seq_lens, dtype=torch.float32,
            query_start_loc=batch.query_start_loc, causal=True, sliding_window_size=-1,
            isa=self.isa, enable_kv_split=False)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
            scale=self.head_dim ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=batch.block_table, softcap=0.0, scheduler_metadata=metadata, s_aux=None)


def processed_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """vLLM's own sampler processing (temperature, top-k/top-p, log_softmax) on engine logits."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
    from vllm.v1.sample.sampler import Sampler

    logits = logits.float().clone()
    n = logits.shape[0]
    if not sampling.is_greedy:
        temp = torch.full((n,), sampling.temperature, dtype=torch.float32)
        logits = Sampler.apply_temperature(logits, temp, all_random=True)
        k = torch.full((n,), sampling.top_k, dtype=torch.int32) if sampling.top_k > 0 else None
        p = torch.full((n,), sampling.top_p, dtype=torch.float32) if sampling.top_p < 1 else None
        logits = apply_top_k_top_p(logits, k, p)
    return logits.log_softmax(dim=-1, dtype=torch.float32)


@dataclass
class _AttentionBatch:
    num_reqs: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor


class _Layout:
    """Where every token of every sequence sits: flat rows, KV slots, attention requests.

    Rows are each sequence's prompt then its completion minus the last token (the last token is
    sampled, never fed back). Sequence s owns its own KV blocks. Attention runs as two batches:
    every prompt as one prefill request, then every completion row as a one-token request that
    sees the cache up to and including itself, which is what the engine's decode step computed.
    """

    def __init__(self, sequences: list[Sequence], block_size: int) -> None:
        ids, positions, slots, prefill_rows, decode_rows, scored = [], [], [], [], [], []
        tables, prefill_lens, decode_lens, decode_tables = [], [], [], []
        block = 0
        for seq in sequences:
            if not seq.prompt or not seq.completion:
                raise ValueError("bitwise scoring needs a prompt and at least one completion token")
            tokens = list(seq.prompt) + list(seq.completion[:-1])
            n_blocks = -(-len(tokens) // block_size)
            table = list(range(block, block + n_blocks))
            start = len(ids)
            for pos, tok in enumerate(tokens):
                ids.append(tok)
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            prefill_rows.extend(range(start, start + len(seq.prompt)))
            prefill_lens.append(len(seq.prompt))
            tables.append(table)
            for pos in range(len(seq.prompt), len(tokens)):
                decode_rows.append(start + pos)
                decode_lens.append(pos + 1)
                decode_tables.append(table)
            # The logits of completion token j come from the row before it.
            scored.extend(range(start + len(seq.prompt) - 1, start + len(tokens)))
            block += n_blocks
        self.num_blocks = block
        self.input_ids = torch.tensor(ids, dtype=torch.long)
        self.positions = torch.tensor(positions, dtype=torch.long)
        self.slot_mapping = torch.tensor(slots, dtype=torch.long)
        self.scored_rows = torch.tensor(scored, dtype=torch.long)
        self.attention_batches = [(torch.tensor(prefill_rows), _batch([len(s.prompt) for s in sequences],
                                                                      prefill_lens, tables))]
        if decode_rows:
            self.attention_batches.append(
                (torch.tensor(decode_rows), _batch([1] * len(decode_rows), decode_lens, decode_tables)))


def _batch(query_lens: list[int], seq_lens: list[int], tables: list[list[int]]) -> _AttentionBatch:
    width = max(len(t) for t in tables)
    table = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
    return _AttentionBatch(len(query_lens), starts, torch.tensor(seq_lens, dtype=torch.int32), table)


def _rope_cache(head_dim: int, cfg) -> torch.Tensor:
    """vLLM's cos/sin table (RotaryEmbedding._compute_cos_sin_cache), float32."""
    base = _rope_parameters(cfg).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
    freqs = torch.einsum("i,j -> ij", t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rope_parameters(cfg) -> dict:
    # transformers 5 keeps theta and type in `rope_parameters` (`rope_scaling` aliases it).
    return dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})


AUDITED_VLLM = "0.32."  # the kernels and layout above were checked against this release


def bitwise_setting_faults(resolved: dict) -> list[str]:
    """What keeps an engine (as `resolved`, RolloutEngine.resolved_settings, reports it) from
    running the layout the kernel pass reproduces; empty when nothing does."""
    needed = {"device": "cpu", "dtype": "float32", "enforce_eager": True,
              "enable_chunked_prefill": False, "enable_prefix_caching": False,
              "async_scheduling": False, "logprobs_mode": "processed_logprobs",
              "cpu_attn_split_kv": False, "single_row_gemm_padded": True}
    faults = [f"{k}={resolved.get(k)!r} (needs {v!r})" for k, v in needed.items()
              if resolved.get(k) != v]
    version = str(resolved.get("vllm_version", ""))
    if not version.startswith(AUDITED_VLLM):
        faults.append(f"vLLM {version} (audited: {AUDITED_VLLM}x)")
    return faults


def check_engine_for_bitwise(resolved: dict) -> None:
    """Refuse, in one line, an engine on which bitwise parity cannot hold (a training run)."""
    faults = bitwise_setting_faults(resolved)
    if faults:
        raise UserError("bitwise parity cannot hold with this engine: " + "; ".join(faults))
