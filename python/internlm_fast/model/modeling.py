"""The InternLM decoder (LLaMA architecture with biased q/k/v/o projections), built only on
internlm_fast.ops. Parameter names match Hugging Face's, so an HF state dict loads as it is.

forward(input_ids, labels=None, cu_seqlens=None) takes a (batch, seqlen) batch, or one packed row
(1, total) of documents delimited by int32 cu_seqlens: attention never crosses a document and
positions restart at 0 in each. Labels have input_ids' shape and are shifted inside (-100 ignored,
and in a packed row the last token of a document does not predict the next document).

With a KV cache (forward(..., cache=...), no autograd) the same layers run one of two inference steps: a packed prefill
of new prompts (each after the tokens its sequence already caches: a reused prefix), or one decode step of one new token
per live sequence. The cache is paged: every sequence's tokens live in blocks of one pool, named in order by its row of
a block table. Their arithmetic is the training forward's; only the kernels differ: the lean forward-only ones of
ops.inference, with the projections on decoding copies of the weights (model/projection.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from internlm_fast import ops
from internlm_fast.ops.inference import inference_kernels

from .config import InternLMConfig
from .projection import FEW_ROWS, MAX_COPY_BYTES, Projection
from .rope import dynamic_rows, needs_dynamic_rows, rotary_tables


@dataclass
class CausalLMOutput:
    loss: Tensor | None = None
    logits: Tensor | None = None  # None when the loss was computed without materialising them
    num_targets: Tensor | None = None  # 0-d int64: the targets the loss averages over (labels != -100)


class KVCacheStorage(Protocol):
    """What the forward reads and writes of a paged KV cache (internlm_fast.infer.KVCache is one): per
    layer, `flat[layer]` (num_blocks * page, 2, kv_heads, head_dim) and its views `keys[layer]` /
    `values[layer]` (num_blocks, page, kv_heads, head_dim); `block_table` int32 (rows, max_blocks):
    sequence b's token t at block block_table[b, t // page], row t % page, i.e. flat row
    block_table[b, t // page] * page + t % page; `lens` int64 (rows,), the tokens cached per sequence,
    advanced by the forward; `batch`, the live rows (the first ones); `max_len` = max_blocks * page."""

    flat: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    block_table: Tensor
    lens: Tensor
    page: int
    batch: int
    max_len: int


@dataclass(slots=True)
class ForwardContext:
    """What every layer reads besides its input."""

    cos: Tensor
    sin: Tensor
    cu_seqlens: Tensor | None = None  # int32: the documents of a packed row
    max_seqlen: int = 0
    kernels: Any = ops  # ops (autograd, argument checks), or ops.inference's kernels with a cache
    cache: KVCacheStorage | None = None
    positions: Tensor | None = None  # int64 (sequences,): the position of each one's first new token
    slots: Tensor | None = None  # int64 (tokens,): each new token's row in cache.flat[layer]
    visible: Tensor | None = None  # int32 (batch,): cached tokens per sequence after the step, its own included
    copy_weights: bool = False  # the projections read decoding copies of the weights
    block_table: Tensor | None = None  # int32 (batch, max_blocks): the rows of this step's sequences
    prefix_cu: list[int] | None = None  # a prefill after cached prefixes: the host copy of cu_seqlens
    # the rows of cos/sin the rotary reads: token t of sequence b at rope_offsets[b] + t (in a packed
    # row t counts from the sequence's start); not the positions when a forward builds its own rows
    # (model/rope.py: dynamic_rows)
    rope_offsets: Tensor | int = 0
    # a decode step whose layers may each run as one kernel call (ops.inference: decode_layer), or None
    decode_layer: Any = None


class RMSNorm(nn.Module):
    """A weight and an eps for rms_norm; with a residual, the add is fused into the norm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor, residual: Tensor | None = None, kernels: Any = ops) -> Tensor | tuple[Tensor, Tensor]:
        return kernels.rms_norm(x, self.weight, self.eps, residual)

    __call__ = forward  # no hook dispatch: see DecoderLayer


class Attention(nn.Module):
    def __init__(self, config: InternLMConfig, layer_idx: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.scale = d**-0.5
        self.q_proj = nn.Linear(h, self.heads * d, bias=config.bias)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=config.bias)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=config.bias)
        self.o_proj = nn.Linear(self.heads * d, h, bias=config.bias)
        self.qkv = Projection(self.q_proj, self.k_proj, self.v_proj)
        self.o = Projection(self.o_proj)

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        qkv = self.qkv(x, ctx)
        if ctx.cache is None:
            out = self._attend(qkv.view(*x.shape[:-1], -1, self.head_dim), ctx).reshape(*x.shape[:-1], -1)
        else:  # x: (tokens, hidden)
            out = self._attend_cache(qkv.view(x.shape[0], -1, self.head_dim), ctx).view(x.shape[0], -1)
        return self.o(out, ctx)

    __call__ = forward  # no hook dispatch: see DecoderLayer

    def _attend(self, qkv: Tensor, ctx: ForwardContext) -> Tensor:
        """Causal attention of qkv (batch, seqlen, heads, head_dim), or of one packed row of documents."""
        hq, hk = self.heads, self.kv_heads
        # q and k are adjacent heads of the one projection: one rotary pass turns both
        if ctx.cu_seqlens is None:
            qk, v = qkv.split([hq + hk, hk], dim=2)
            q, k = ops.apply_rotary(qk, ctx.cos, ctx.sin, seqlen_offsets=ctx.rope_offsets).split([hq, hk], dim=2)
            return ops.flash_attn_func(q, k, v, causal=True)
        cu, n = ctx.cu_seqlens, ctx.max_seqlen  # (total, heads, head_dim), positions per document
        qk, v = qkv[0].split([hq + hk, hk], dim=1)
        rotated = ops.apply_rotary(qk, ctx.cos, ctx.sin, seqlen_offsets=ctx.rope_offsets, cu_seqlens=cu, max_seqlen=n)
        q, k = rotated.split([hq, hk], dim=1)
        return ops.flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True)

    def _attend_cache(self, qkv: Tensor, ctx: ForwardContext) -> Tensor:
        """qkv (tokens, heads, head_dim) of the new tokens: rotates q and k in place, appends k and v to
        the cache, then attends over the cache (decode) or among the new prompts (prefill). A cache in
        another dtype than the model's (a bf16 cache for an fp32 model) stores k and v converted, and
        the queries meet it in its dtype."""
        hq, hk, kern, cache, i = self.heads, self.kv_heads, ctx.kernels, ctx.cache, self.layer_idx
        keys, values, table, flat = cache.keys[i], cache.values[i], ctx.block_table, cache.flat[i]
        same = flat.dtype == qkv.dtype
        if ctx.cu_seqlens is None:  # one token per sequence
            if same:  # rotary and append in one pass
                kern.rotary_append_(qkv, ctx.cos, ctx.sin, ctx.rope_offsets, flat, ctx.slots, hq)
            else:
                kern.rotary_(qkv[:, None, : hq + hk], ctx.cos, ctx.sin, ctx.rope_offsets)
                flat.index_copy_(0, ctx.slots, qkv[:, hq:].view(-1, 2, hk, self.head_dim).to(flat.dtype))
            q = qkv[:, None, :hq] if same else qkv[:, None, :hq].to(flat.dtype)
            out = kern.attend_cache(q, keys, values, ctx.visible, self.scale, table)
            return out if same else out.to(qkv.dtype)
        kern.rotary_(qkv[:, : hq + hk], ctx.cos, ctx.sin, ctx.rope_offsets, ctx.cu_seqlens)
        flat.index_copy_(0, ctx.slots, qkv[:, hq:].view(-1, 2, hk, self.head_dim).to(flat.dtype))
        q, k, v = qkv.split([hq, hk, hk], dim=1)
        if ctx.prefix_cu is None:  # fresh prompts attend among their own tokens
            return kern.attend_varlen(q, k, v, ctx.cu_seqlens, self.scale)
        # after a cached prefix: each prompt's queries attend over its whole cache
        out, cu = torch.empty_like(q), ctx.prefix_cu
        q = q.to(flat.dtype)
        for b in range(len(cu) - 1):
            a, e = cu[b], cu[b + 1]
            seen = ctx.visible[b : b + 1]
            out[a:e] = kern.attend_cache(q[None, a:e], keys, values, seen, self.scale, table[b : b + 1])[0]
        return out


class MLP(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up = Projection(self.gate_proj, self.up_proj)
        self.down = Projection(self.down_proj)

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        return self.down(ctx.kernels.swiglu_packed(self.gate_up(x, ctx)), ctx)

    __call__ = forward  # no hook dispatch: see DecoderLayer


class DecoderLayer(nn.Module):
    """Its parts (RMSNorm, Attention, MLP) are called without nn.Module.__call__'s hook dispatch: a
    decode step of a small model is bound by Python time, and the dispatch of their four calls a
    layer cost 5% of a step of the tiny preset. Forward hooks go on the decoder layers, which keep the
    dispatch (ZeRO's parameter prefetch hooks them)."""

    def __init__(self, config: InternLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, residual: Tensor | None, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        """x: the previous sublayer's output (or the embeddings when residual is None). Returns this
        layer's MLP output and the residual stream before it; the next norm adds them (fused)."""
        if ctx.decode_layer is not None:
            out = self._decode_in_one_call(x, residual, ctx)
            if out is not None:
                return out
        kernels = ctx.kernels
        if residual is None:
            residual, h = x, self.input_layernorm(x, None, kernels)
        else:
            h, residual = self.input_layernorm(x, residual, kernels)
        attn = self.self_attn(h, ctx)
        h, residual = self.post_attention_layernorm(attn, residual, kernels)
        return self.mlp(h, ctx), residual

    def _decode_in_one_call(self, x: Tensor, residual: Tensor | None, ctx: ForwardContext) -> tuple | None:
        """The decode step below as one call of the decode_layer kernel, which runs the same kernels in
        the same order (the same result to the bit) with no Python between them: after each GEMM's
        stream of weights the caches hold nothing else, and every line of Python or dispatch run
        between two GEMMs starts cold. None where a projection is not in decode-GEMM layout."""
        attn, mlp = self.self_attn, self.mlp
        weights = (attn.qkv.decode_weights, attn.o.decode_weights, mlp.gate_up.decode_weights, mlp.down.decode_weights)
        if None in weights:
            return None
        (qkv, qkv_s, qkv_b), (o, o_s, o_b), (gu, gu_s, _), (down, down_s, _) = weights
        cache, i = ctx.cache, attn.layer_idx
        return ctx.decode_layer(
            x, residual, self.input_layernorm.weight, self.post_attention_layernorm.weight,
            self.input_layernorm.eps, qkv, qkv_s, qkv_b, o, o_s, o_b, gu, gu_s, down, down_s,
            ctx.cos, ctx.sin, ctx.rope_offsets, cache.flat[i], ctx.slots, cache.keys[i], cache.values[i],
            ctx.visible, ctx.block_table, attn.scale, attn.heads,
        )  # fmt: skip


class InternLMModel(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, ctx: ForwardContext) -> Tensor:
        """The final normed hidden states, input_ids' shape + (hidden,)."""
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            if recompute:
                x, residual = checkpoint(layer, x, residual, ctx, use_reentrant=False)
            else:
                x, residual = layer(x, residual, ctx)
        h, _ = self.norm(x, residual, ctx.kernels)
        return h


# The generation API (decoding loop, sampling, stop strings, streaming, chat) is internlm_fast.infer,
# which builds on this module: the model names it rather than importing it, so model/ depends on
# nothing above it and is complete without it.
GENERATION_API = "internlm_fast.infer.model_api"


class InternLMForCausalLM(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = InternLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.head = Projection(self.lm_head)
        cos, sin = rotary_tables(config)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self._linear_numel = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        self._inference: tuple | None = None  # (kernels, cos, sin, copy_weights) of the last prefill
        self.quantization: str | None = None  # quantize_'s method: the model is then inference only
        self.inference_layout = False  # prepare_inference_ released bf16 weights: inference only too
        self.apply(self._init)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_inference": None}  # kernels are bound per process

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """The final normed hidden states, (batch, seqlen, hidden)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError(f"a packed batch is one row (1, total) with cu_seqlens; got {tuple(input_ids.shape)}")
        seqlen = input_ids.shape[1]
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens is not None else seqlen
        self._check_length(max_seqlen)
        ctx = ForwardContext(self.rotary_cos, self.rotary_sin, cu_seqlens, max_seqlen)
        if needs_dynamic_rows(self.config, max_seqlen):
            device = input_ids.device
            if cu_seqlens is None:  # every row has seqlen tokens: one row of cos/sin per position
                positions = torch.arange(seqlen, device=device)
                ctx.cos, ctx.sin = dynamic_rows(self.config, positions, torch.full_like(positions, seqlen))
            else:  # one row per token, each document with the frequencies of its own length
                starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
                doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=seqlen)
                positions = torch.arange(seqlen, device=device) - starts[doc]
                ctx.cos, ctx.sin = dynamic_rows(self.config, positions, lengths[doc])
                ctx.rope_offsets = starts
        return self.model(input_ids, ctx)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        return_logits: bool = False,
        cache: KVCacheStorage | None = None,
    ) -> CausalLMOutput:
        """The loss (with labels) or the logits. With a cache: forward_cached's logits, (sequences, vocab)."""
        if cache is not None:
            if labels is not None:
                raise ValueError("labels and a KV cache do not go together: the cached forward is inference only")
            return CausalLMOutput(logits=self.forward_cached(input_ids, cache, cu_seqlens))
        released = self._released_weights()
        if released is not None and (labels is not None or torch.is_grad_enabled()):
            raise RuntimeError(
                f"this model is {released}: inference only, without labels or autograd; run it under "
                "torch.no_grad() or torch.inference_mode()"
            )
        h = self.hidden_states(input_ids, cu_seqlens)
        if labels is None:
            if self.head.quantized:
                return CausalLMOutput(logits=self.head.int8_linear(h))
            if self.head.laid_out:
                return CausalLMOutput(logits=self.head.bf16_linear(h))
            return CausalLMOutput(logits=ops.linear(h, self.lm_head.weight))
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(input_ids.shape)}")
        target = labels[:, 1:].clone()
        if cu_seqlens is not None:  # a document's last token does not predict the next document
            ends = cu_seqlens[1:-1].long() - 1
            target[0, ends[(ends >= 0) & (ends < target.shape[1])]] = -100
        hs = h[:, :-1].reshape(-1, h.shape[-1])
        loss = ops.fused_linear_cross_entropy(hs, self.lm_head.weight, target.reshape(-1))
        logits = ops.linear(h, self.lm_head.weight) if return_logits else None
        return CausalLMOutput(loss=loss, logits=logits, num_targets=(target != -100).sum())

    def forward_cached(
        self,
        input_ids: Tensor,
        cache: KVCacheStorage,
        cu_seqlens: Tensor | None = None,
        *,
        rope_lengths: Sequence[int] | None = None,
    ) -> Tensor:
        """One inference step against a KV cache (no autograd): with cu_seqlens, input_ids (1, total)
        holds new prompts packed, prefilled into the first cache rows after the tokens those rows already
        hold (a reused prefix, or none); without, input_ids (cache.batch, 1) holds one new token per live
        sequence, at position cache.lens. The block table must already name the blocks the new tokens
        go to. Writes the new tokens' keys and values, advances cache.lens and returns the logits after
        each sequence's last new token, (sequences, vocab). A prefill chooses the kernels and checks the
        decoding copies of the weights; the decode steps after it reuse them (nothing changes within a generation).
        rope_lengths (a prefill, dynamic rope scaling): the sequence length whose frequencies each prompt's
        new tokens rotate with, instead of the tokens cached after the step: a prompt prefilled in chunks
        gives every chunk its whole length, as one prefill would (model/rope.py)."""
        if torch.is_grad_enabled():
            raise RuntimeError("the forward with a KV cache has no autograd: run it under torch.inference_mode()")
        if cu_seqlens is None:
            ctx = self._decode_context(input_ids, cache)
        else:
            ctx = self._prefill_context(input_ids, cache, cu_seqlens, rope_lengths)
        h = self.model(input_ids.view(-1), ctx)
        if cu_seqlens is not None:
            h = h[cu_seqlens[1:].long() - 1]
        logits = self.head(h, ctx)
        if cu_seqlens is not None:
            cache.lens[: cu_seqlens.shape[0] - 1] += (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        else:
            ctx.positions += 1  # a view of cache.lens
        return logits

    def _decode_context(self, input_ids: Tensor, cache: KVCacheStorage) -> ForwardContext:
        b = cache.batch
        if input_ids.shape != (b, 1):
            raise ValueError(f"a decode step takes one token per live sequence, ({b}, 1); got {tuple(input_ids.shape)}")
        positions = cache.lens[:b]
        limit = min(cache.max_len, self.config.context_length)
        last = int(positions.max()) if b else 0
        if b and last >= limit:
            raise ValueError(f"a sequence is full: {limit} tokens (the cache length or the model's context_length)")
        kernels, cos, sin, copy = self._inference or self._inference_setup()
        table = cache.block_table[:b]
        page = cache.page
        slots = table.gather(1, (positions // page)[:, None])[:, 0].long() * page + positions % page
        visible = (positions + 1).to(torch.int32)
        offsets = positions
        if needs_dynamic_rows(self.config, last + 1):  # each token rotates with its sequence's length after it
            cos, sin = dynamic_rows(self.config, positions, positions + 1)
            offsets = torch.arange(b, device=positions.device)
        ctx = ForwardContext(cos, sin, None, 0, kernels, cache, positions, slots, visible, copy, table)
        ctx.rope_offsets = offsets
        # each layer in one call where its kernels are the C++ ones and take these inputs: few rows,
        # rotary tables in fp32, the cache in the activations' dtype
        dtype = self.model.embed_tokens.weight.dtype
        if (
            kernels.decode_layer is not None
            and b <= FEW_ROWS
            and dtype in (torch.float32, torch.bfloat16)
            and cos.dtype == torch.float32
            and cache.flat[0].dtype == dtype
        ):
            ctx.decode_layer = kernels.decode_layer
        return ctx

    def _prefill_context(
        self, input_ids: Tensor, cache: KVCacheStorage, cu_seqlens: Tensor, rope_lengths: Sequence[int] | None
    ) -> ForwardContext:
        limit = min(cache.max_len, self.config.context_length)
        cu, cached = self._check_prefill(input_ids, cache, cu_seqlens, limit)
        n, device, page = len(cu) - 1, input_ids.device, cache.page
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(n, device=device), lengths)
        starts = cache.lens[:n]
        pos = starts[seq] + torch.arange(input_ids.shape[1], device=device) - cu_seqlens[:-1].long()[seq]
        table = cache.block_table[:n]
        slots = table[seq, pos // page].long() * page + pos % page
        kernels, cos, sin, copy = self._inference_setup()
        visible = (starts + lengths).to(torch.int32) if any(cached) else None
        ctx = ForwardContext(
            cos, sin, cu_seqlens, 0, kernels, cache, starts, slots, visible, copy, table, cu if any(cached) else None
        )
        ctx.rope_offsets = starts
        if rope_lengths is None:
            rope_lengths = [c + b - a for c, a, b in zip(cached, cu, cu[1:])]
        elif len(rope_lengths) != n or any(r < c + b - a for r, c, a, b in zip(rope_lengths, cached, cu, cu[1:])):
            raise ValueError(
                f"rope_lengths {list(rope_lengths)} must give each prompt at least its tokens cached after the step"
            )
        if needs_dynamic_rows(self.config, max(rope_lengths)):
            per_prompt = torch.tensor(rope_lengths, dtype=torch.int64, device=device)
            ctx.cos, ctx.sin = dynamic_rows(self.config, pos, per_prompt[seq])
            ctx.rope_offsets = cu_seqlens[:-1].long()
        return ctx

    def _inference_setup(self) -> tuple[Any, Tensor, Tensor, bool]:
        """The kernels for this model's device under the backend forced now, the rotary tables in fp32
        (the fused rotary + append kernels take fp32 tables whatever the model's dtype) and whether the
        projections decode on copies of the weights; kept for the decode steps."""
        cos, sin = self.rotary_cos, self.rotary_sin
        if cos.dtype != torch.float32:
            cos, sin = rotary_tables(self.config, cos.device)
        weight = self.lm_head.weight
        copy = self._linear_numel * weight.element_size() <= MAX_COPY_BYTES
        self._inference = (inference_kernels(weight), cos, sin, copy)
        return self._inference

    @staticmethod
    def _check_prefill(
        input_ids: Tensor, cache: KVCacheStorage, cu_seqlens: Tensor, limit: int
    ) -> tuple[list[int], list[int]]:
        """cu_seqlens and the tokens each prompt's row already caches, on the host, after checking
        them (one read of each)."""
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.device != input_ids.device:
            raise ValueError("cu_seqlens must be an int32 tensor (prompts + 1,) on input_ids' device")
        cu = cu_seqlens.tolist()
        n = len(cu) - 1
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or not 1 <= n <= cache.batch:
            raise ValueError(
                f"a prefill takes one packed row (1, total) of 1 to {cache.batch} prompts with cu_seqlens; "
                f"got input_ids {tuple(input_ids.shape)} and {n} prompts"
            )
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        cached = cache.lens[:n].tolist()
        if cu[0] != 0 or cu[-1] != input_ids.shape[1] or not all(1 <= t for t in lengths):
            raise ValueError(f"cu_seqlens must run from 0 to {input_ids.shape[1]} in steps of >= 1 token; got {cu}")
        too_long = [b for b in range(n) if cached[b] + lengths[b] > limit]
        if too_long:
            b = too_long[0]
            raise ValueError(
                f"prompt {b} has {lengths[b]} tokens after {cached[b]} cached ones: more than {limit} "
                "(cache length, the model's context_length)"
            )
        return cu, cached

    def _check_length(self, tokens: int) -> None:
        c = self.config
        if tokens > c.context_length:
            scaled = f" times the rope_scaling factor: {c.context_length}" if c.rope_scaling else ""
            raise ValueError(
                f"sequence of {tokens} tokens exceeds max_position_embeddings {c.max_position_embeddings}{scaled}"
            )

    # -- generation: internlm_fast.infer's, with InternLM's and transformers' method names ---------

    def generate(self, *args, **kwargs) -> Tensor:
        """transformers' generate: input_ids (batch, seqlen) followed by the new ids. Arguments: those
        of internlm_fast.infer.model_api.generate (max_new_tokens, do_sample, temperature, top_p, ...)."""
        return _generation_api().generate(self, *args, **kwargs)

    def chat(self, tokenizer, query: str, history: Sequence[tuple[str, str]] = (), **gen) -> tuple[str, list]:
        """InternLM's chat: (response, history + [(query, response)]); defaults in infer.chat.CHAT_DEFAULTS."""
        return _generation_api().chat(self, tokenizer, query, history, **gen)

    def stream_chat(self, tokenizer, query: str, history: Sequence[tuple[str, str]] = (), **gen) -> Iterator:
        """Yields (response so far, history + [(query, response so far)]) as the response grows."""
        return _generation_api().stream_chat(self, tokenizer, query, history, **gen)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        quantize: str | None = None,
        inference: bool = False,
    ) -> InternLMForCausalLM:
        """A model folder, transformers LLaMA/InternLM folder or checkpoint: see model.pretrained.load_pretrained.
        inference=True: a bf16 model comes in prepare_inference_'s layout, its panels built while the
        weights are read (one tensor at a time, never the whole file resident); other dtypes and
        devices load as usual. quantize="int8": then quantized for inference, as quantize_ does. An
        int8 folder (model.quantized_folder) loads quantized, with or without quantize="int8"."""
        from .pretrained import load_pretrained
        from .quantize import check_quantize, quantize_loaded

        check_quantize(quantize)
        model = load_pretrained(path, dtype=dtype, device=device, inference=inference)
        return quantize_loaded(model, quantize)

    def projections(self) -> list[Projection]:
        """Every projection: each layer's q/k/v, o, gate/up and down, then lm_head."""
        found = []
        for layer in self.model.layers:
            found += [layer.self_attn.qkv, layer.self_attn.o, layer.mlp.gate_up, layer.mlp.down]
        return found + [self.head]

    def prepare_inference_(self) -> InternLMForCausalLM:
        """Lays a bf16 model out for decoding on the CPU: each projection keeps only the bf16 column
        panels its decode kernel (few_rows_linear_bf16) reads, and its linears' weights are released,
        one projection at a time, so the linear weights are held once (a bf16 model otherwise keeps
        the panels beside the parameters). Prefill rebuilds one projection's weight at a time. The
        model no longer trains and cannot be saved. A tied lm_head keeps the embedding, which needs
        it. Other dtypes, devices without the kernel and quantized models are left as they are. Move
        the model to its device first; for a model folder, from_pretrained(..., inference=True)
        builds the panels while reading it instead (memory-mapped weights, once read here, stay
        resident until the whole file is unmapped)."""
        if self.quantization is not None:
            return self
        weight = self.lm_head.weight
        kernels = inference_kernels(weight)
        todo = [
            p
            for p in self.projections()
            if not p.laid_out
            and all(lin.weight.dtype == torch.bfloat16 for lin in p.linears)
            and p.fits_bf16_layout(kernels)
        ]
        self._lay_out_bf16(todo, weight.device)
        return self

    def _lay_out_bf16(self, todo: list[Projection], device: torch.device | str, read=None) -> None:
        embedding = self.model.embed_tokens.weight
        for proj in todo:
            release = all(lin.weight is not embedding for lin in proj.linears)
            proj.lay_out_bf16_(read, release=release, device=device)
        if todo:
            self.inference_layout = True
            self._inference = None

    def _released_weights(self) -> str | None:
        """Why the model is inference only (its float weights released), or None if it is not."""
        if self.quantization is not None:
            return f"quantized (quantize={self.quantization!r})"
        if self.inference_layout:
            return "laid out for inference (prepare_inference_, from_pretrained(..., inference=True))"
        return None

    def quantize_(self, quantize: str = "int8") -> InternLMForCausalLM:
        """Quantizes the linears' weights in place for inference (weight-only int8, see model.quantize);
        the float weights are released, so the model no longer trains. Move it to its device first."""
        from .quantize import quantize_model

        return quantize_model(self, quantize)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB", tokenizer=None) -> Path:
        """This model (and the tokenizer, if given) as a transformers LLaMA folder: see
        model.pretrained.save_pretrained; a quantized model as an int8 folder (model.quantized_folder)."""
        from .pretrained import save_pretrained

        released = self._released_weights()
        if released is not None and self.quantization is None:
            raise ValueError(f"this model is {released}: its weights were released; save the model it came from")

        return save_pretrained(self, path, max_shard_size=max_shard_size, tokenizer=tokenizer)


def _generation_api() -> ModuleType:
    return importlib.import_module(GENERATION_API)
