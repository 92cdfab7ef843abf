"""The KV-cache forward of InternLMForCausalLM: packed prefill and one-token decode steps.

Prefill runs a batch of prompts of different lengths as one packed row (flash_attn_varlen_func's
layout: no padding), writes every token's rotated keys and values into the cache, and returns the
logits of each prompt's last token only. A decode step feeds one token per live sequence and attends
over the cache (flash_attn_with_kvcache's kernel). Same function as model.forward, in fp32 to
rounding (tests/test_generate_kvcache.py).

Speed at small batch is Python overhead and reading the weights, so the step is lean: the backend
kernels are called directly (ops.inference), q/k/v and gate/up are one GEMM each against weight
copies made once per model version (see Projection: column panels for the few rows of a decode step,
which few_rows_linear streams once on every thread), rotary and the cache append are one pass
(rotary_append_), and no tensor but the outputs is allocated per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from internlm_fast.model import InternLMForCausalLM
from internlm_fast.model.modeling import rotary_tables
from internlm_fast.ops import backend
from internlm_fast.ops.inference import InferenceKernels

from .kv_cache import KVCache

# The decode projections use transposed (in, out) copies of the weights, q/k/v and gate/up side by
# side: a (rows, in) x (in, out) product streams the weight rows in order, twice as fast at one row as
# F.linear's (out, in) layout on 2 cores (a decode step of the tiny preset: 1.05 vs 1.96 ms), and one
# GEMM instead of three saves the calls; decode steps read a second copy laid out as column panels
# (few_rows_linear). Past this many bytes per copy (a 7B model) the memory matters more: the
# parameters are used as they are.
MAX_COPY_BYTES = 1 << 30

# Decode steps of at most this many rows (sequences) run through ops.inference's few-rows kernel on
# the weights' column panels; longer inputs (prefill) use the GEMM on the (in, out) copy.
FEW_ROWS = 16


class Projection:
    """x W^T + b of one or several nn.Linear on the same input, outputs side by side."""

    def __init__(self, linears: list[nn.Linear], copy: bool, kernels: InferenceKernels) -> None:
        self.wt = self.bias = self.panels = None
        self.parts = [(lin.weight, lin.bias) for lin in linears]
        self.few_rows = kernels.few_rows_linear
        if copy:
            self.wt = torch.cat([lin.weight for lin in linears]).t().contiguous()
            if linears[0].bias is not None:
                self.bias = torch.cat([lin.bias for lin in linears])
            if kernels.has_few_rows_linear(self.wt):
                self.panels = kernels.column_panels(self.wt)

    def __call__(self, x: Tensor) -> Tensor:
        if self.panels is not None and x.shape[0] <= FEW_ROWS:
            return self.few_rows(x, self.panels, self.bias)
        if self.wt is not None:
            return torch.mm(x, self.wt) if self.bias is None else torch.addmm(self.bias, x, self.wt)
        if len(self.parts) == 1:
            return F.linear(x, *self.parts[0])
        return torch.cat([F.linear(x, w, b) for w, b in self.parts], dim=-1)


@dataclass
class LayerWeights:
    norm1: Tensor
    norm2: Tensor
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection


def _layer_weights(layer: nn.Module, copy: bool, kernels: InferenceKernels) -> LayerWeights:
    a, m = layer.self_attn, layer.mlp
    return LayerWeights(
        norm1=layer.input_layernorm.weight,
        norm2=layer.post_attention_layernorm.weight,
        qkv=Projection([a.q_proj, a.k_proj, a.v_proj], copy, kernels),
        o=Projection([a.o_proj], copy, kernels),
        gate_up=Projection([m.gate_proj, m.up_proj], copy, kernels),
        down=Projection([m.down_proj], copy, kernels),
    )


def _linear_params(model: InternLMForCausalLM) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


_CACHE_ATTR = "_internlm_fast_decode_weights"


def decode_weights(model: InternLMForCausalLM) -> tuple[list[LayerWeights], Projection]:
    """Per-layer weights and the head for decoding, built once and reused while no parameter changes
    (a training step, load_state_dict or .to() bumps a version counter or moves the storage) and the
    forced backend is the same (it decides which kernels the weights are laid out for)."""
    key = (backend.forced_backend(), *((p.data_ptr(), p._version) for p in model.parameters()))
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        copy = _linear_params(model) * model.lm_head.weight.element_size() <= MAX_COPY_BYTES
        kernels = InferenceKernels(model.lm_head.weight)
        layers = [_layer_weights(layer, copy, kernels) for layer in model.model.layers]
        weights = layers, Projection([model.lm_head], copy, kernels)
    model.__dict__[_CACHE_ATTR] = (key, weights)
    return weights


class CachedDecoder:
    """Prefill and decode steps of `model` against a KVCache. Use under torch.inference_mode()."""

    def __init__(self, model: InternLMForCausalLM) -> None:
        c = model.config
        self.config = c
        self.model = model
        self.hq, self.hk, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = 1.0 / math.sqrt(self.d)
        self.eps = c.rms_norm_eps
        self.embed = model.model.embed_tokens.weight
        self.norm = model.model.norm.weight
        # fp32 tables whatever the model's dtype: the fused rotary + append kernels take fp32 tables
        self.cos, self.sin = rotary_tables(c, model.lm_head.weight.device)
        self.layers, self.head = decode_weights(model)
        self.kernels = InferenceKernels(self.embed)
        self.device, self.dtype = self.embed.device, self.embed.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, max_len, self.hk, self.d, self.dtype, self.device)

    def _mlp(self, h: Tensor, w: LayerWeights) -> Tensor:
        gu = w.gate_up(h)
        f = gu.shape[-1] // 2
        return w.down(self.kernels.swiglu(gu[:, :f], gu[:, f:]))

    def _layers(self, x: Tensor, attend) -> tuple[Tensor, Tensor]:
        """Runs every layer on x (tokens, hidden); attend(layer, qkv3) -> attention output. Returns the
        last MLP output and the residual stream (the final norm adds them)."""
        kern, eps, hq, hk, d = self.kernels, self.eps, self.hq, self.hk, self.d
        n = x.shape[0]
        residual = None
        for i, w in enumerate(self.layers):
            if residual is None:
                h, residual = kern.rms_norm(x, w.norm1, eps), x
            else:
                h, residual = kern.rms_norm(x, w.norm1, eps, residual)
            qkv = w.qkv(h)
            out = attend(i, qkv.view(n, hq + 2 * hk, d))
            x = w.o(out.view(n, hq * d))
            h, residual = kern.rms_norm(x, w.norm2, eps, residual)
            x = self._mlp(h, w)
        return x, residual

    def prefill(self, cache: KVCache, prompts: list[list[int]]) -> Tensor:
        """Runs the prompts (one per live cache row, each at most the cache length) into an empty
        cache. Returns the logits after each prompt's last token, (batch, vocab)."""
        lengths = [len(p) for p in prompts]
        device, hq, hk = self.device, self.hq, self.hk
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
        cu = torch.zeros(len(prompts) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.tensor(lengths, device=device).cumsum(0)
        seq = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device))
        slots = cache.row_starts[seq] + (torch.arange(ids.numel(), device=device) - cu[:-1].long()[seq])
        zeros = torch.zeros(len(prompts), dtype=torch.int64, device=device)
        kern, cos, sin = self.kernels, self.cos, self.sin

        def attend(i: int, qkv3: Tensor) -> Tensor:
            kern.rotary_(qkv3[:, : hq + hk], cos, sin, zeros, cu)
            cache.flat[i].index_copy_(0, slots, qkv3[:, hq:].view(-1, 2, hk, self.d))
            return kern.attend_varlen(qkv3[:, :hq], qkv3[:, hq : hq + hk], qkv3[:, hq + hk :], cu, self.scale)

        x, residual = self._layers(F.embedding(ids, self.embed), attend)
        last = cu[1:].long() - 1
        h, _ = kern.rms_norm(x[last], self.norm, self.eps, residual[last])
        cache.lens[: len(prompts)] = torch.tensor(lengths, device=device)
        return self.head(h)

    def decode(self, cache: KVCache, tokens: Tensor) -> Tensor:
        """One new token per live sequence, tokens (batch,) int64, at position cache.lens. Returns the
        logits after it, (batch, vocab), and advances cache.lens."""
        b, hq, hk, d = tokens.shape[0], self.hq, self.hk, self.d
        lens = cache.lens[:b]
        slots = cache.row_starts[:b] + lens
        visible = (lens + 1).to(torch.int32)
        kern, cos, sin = self.kernels, self.cos, self.sin

        def attend(i: int, qkv3: Tensor) -> Tensor:
            kern.rotary_append_(qkv3, cos, sin, lens, cache.flat[i], slots, hq)
            q = qkv3.view(b, 1, hq + 2 * hk, d)[:, :, :hq]
            return kern.attend_cache(q, cache.keys[i], cache.values[i], visible, self.scale)

        x, residual = self._layers(F.embedding(tokens, self.embed), attend)
        h, _ = kern.rms_norm(x, self.norm, self.eps, residual)
        lens += 1
        return self.head(h)
