"""The KV-cache forward of InternLMForCausalLM: packed prefill and one-token decode steps.

Prefill runs a batch of prompts of different lengths as one packed row (flash_attn_varlen_func's
layout: no padding), writes every token's rotated keys and values into the cache, and returns the
logits of each prompt's last token only. A decode step feeds one token per live sequence and attends
over the cache (flash_attn_with_kvcache's kernel). Same function as model.forward, in fp32 to
rounding (tests/test_generate_kvcache.py).

Speed at small batch is Python overhead, so the step is lean: the backend kernels are called
directly (ops.inference), q/k/v and gate/up are one GEMM each against weights concatenated once per
model version (kept while the parameters are unchanged), k and v are written into the cache with one
index_copy_, and no tensor but the outputs is allocated per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from internlm_fast.model import InternLMForCausalLM
from internlm_fast.ops.inference import InferenceKernels

from .kv_cache import KVCache

# Concatenated q/k/v and gate/up weights are copies; past this many bytes (a 7B model) the copies
# would cost real memory while the separate GEMMs' call overhead no longer matters.
MAX_FUSED_BYTES = 1 << 30


@dataclass
class LayerWeights:
    norm1: Tensor
    norm2: Tensor
    qkv: tuple[Tensor, Tensor | None] | None  # fused (weight, bias), or None: q/k/v run separately
    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    o: tuple[Tensor, Tensor | None]
    gate_up: Tensor | None  # fused, or None: gate and up run separately
    gate: Tensor
    up: Tensor
    down: Tensor


def _layer_weights(layer, fuse: bool) -> LayerWeights:
    a, m = layer.self_attn, layer.mlp
    lin = lambda mod: (mod.weight, mod.bias)  # noqa: E731
    qkv = None
    if fuse:
        bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        qkv = (torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), bias)
    return LayerWeights(
        norm1=layer.input_layernorm.weight,
        norm2=layer.post_attention_layernorm.weight,
        qkv=qkv,
        q=lin(a.q_proj),
        k=lin(a.k_proj),
        v=lin(a.v_proj),
        o=lin(a.o_proj),
        gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]) if fuse else None,
        gate=m.gate_proj.weight,
        up=m.up_proj.weight,
        down=m.down_proj.weight,
    )


def _fused_bytes(model: InternLMForCausalLM) -> int:
    c = model.config
    per_layer = (c.hidden_size + 2 * c.num_key_value_heads * c.head_dim + 2 * c.intermediate_size) * c.hidden_size
    return per_layer * c.num_hidden_layers * model.lm_head.weight.element_size()


_CACHE_ATTR = "_internlm_fast_decode_weights"


def decode_weights(model: InternLMForCausalLM) -> list[LayerWeights]:
    """Per-layer weights for decoding, built once and reused while no parameter changes (a training
    step, load_state_dict or .to() bumps a version counter or moves the storage)."""
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        fuse = _fused_bytes(model) <= MAX_FUSED_BYTES
        layers = [_layer_weights(layer, fuse) for layer in model.model.layers]
    model.__dict__[_CACHE_ATTR] = (key, layers)
    return layers


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
        self.head = model.lm_head.weight
        self.cos, self.sin = model.rotary_cos.contiguous(), model.rotary_sin.contiguous()
        self.layers = decode_weights(model)
        self.kernels = InferenceKernels(self.embed)
        self.device, self.dtype = self.embed.device, self.embed.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, max_len, self.hk, self.d, self.dtype, self.device)

    def _qkv(self, h: Tensor, w: LayerWeights) -> Tensor:
        if w.qkv is not None:
            return F.linear(h, *w.qkv)
        return torch.cat([F.linear(h, *w.q), F.linear(h, *w.k), F.linear(h, *w.v)], dim=-1)

    def _mlp(self, h: Tensor, w: LayerWeights) -> Tensor:
        if w.gate_up is not None:
            gu = F.linear(h, w.gate_up)
            f = gu.shape[-1] // 2
            act = self.kernels.swiglu(gu[:, :f], gu[:, f:])
        else:
            act = self.kernels.swiglu(F.linear(h, w.gate), F.linear(h, w.up))
        return F.linear(act, w.down)

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
            qkv = self._qkv(h, w)
            out = attend(i, qkv.view(n, hq + 2 * hk, d))
            x = F.linear(out.view(n, hq * d), *w.o)
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
        cache.longest = max(lengths)
        return F.linear(h, self.head)

    def decode(self, cache: KVCache, tokens: Tensor) -> Tensor:
        """One new token per live sequence, tokens (batch,) int64, at position cache.lens. Returns the
        logits after it, (batch, vocab), and advances cache.lens."""
        b, hq, hk, d = tokens.shape[0], self.hq, self.hk, self.d
        lens = cache.lens[:b]
        slots = cache.row_starts[:b] + lens
        visible = (lens + 1).to(torch.int32)
        longest = cache.longest + 1
        kern, cos, sin = self.kernels, self.cos, self.sin

        def attend(i: int, qkv3: Tensor) -> Tensor:
            qkv4 = qkv3.view(b, 1, hq + 2 * hk, d)
            kern.rotary_(qkv4[:, :, : hq + hk], cos, sin, lens)
            cache.flat[i].index_copy_(0, slots, qkv3[:, hq:].view(b, 2, hk, d))
            return kern.attend_cache(qkv4[:, :, :hq], cache.keys[i], cache.values[i], visible, self.scale, longest)

        x, residual = self._layers(F.embedding(tokens, self.embed), attend)
        h, _ = kern.rms_norm(x, self.norm, self.eps, residual)
        lens += 1
        cache.longest = longest
        return F.linear(h, self.head)
