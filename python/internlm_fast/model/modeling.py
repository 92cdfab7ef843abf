"""The InternLM decoder (LLaMA architecture with biased q/k/v/o projections), built only on
internlm_fast.ops. Parameter names match Hugging Face's, so an HF state dict loads as it is.

forward(input_ids, labels=None, cu_seqlens=None) takes a (batch, seqlen) batch, or one packed row
(1, total) of documents delimited by int32 cu_seqlens: attention never crosses a document and
positions restart at 0 in each. Labels have input_ids' shape and are shifted inside (-100 ignored,
and in a packed row the last token of a document does not predict the next document).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from internlm_fast import ops

from .config import InternLMConfig


@dataclass
class CausalLMOutput:
    loss: Tensor | None = None
    logits: Tensor | None = None  # None when the loss was computed without materialising them


def rotary_tables(config: InternLMConfig, device=None) -> tuple[Tensor, Tensor]:
    """cos/sin (max_position_embeddings, head_dim / 2) in fp32, half-rotated layout."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    angles = torch.arange(config.max_position_embeddings, dtype=torch.float64, device=device)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


# Below this many tokens (decoding, short prompts) concatenating the weights on every call would
# copy more bytes than the one larger GEMM saves; packed_linear concatenates the outputs instead.
FUSED_GEMM_MIN_TOKENS = 512


def packed_linear(x: Tensor, linears: tuple[nn.Linear, ...]) -> Tensor:
    """The outputs of several linears on the same input side by side, [x W_1^T + b_1 | x W_2^T + b_2 | ...].

    With enough tokens it is one GEMM against the concatenated weights (concatenated per call, so the
    parameters keep their HF names): one pass over x, and in the backward one input-gradient GEMM
    and one weight-gradient GEMM, N times larger, which run markedly faster than N small ones
    (q/k/v at hidden 256: 9.2 -> 5.8 ms for the weight gradients on 2 cores)."""
    if x.numel() < FUSED_GEMM_MIN_TOKENS * x.shape[-1]:
        return torch.cat([lin(x) for lin in linears], dim=-1)
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return F.linear(x, weight, bias)


class RMSNorm(nn.Module):
    """A weight and an eps for ops.rms_norm; with a residual, the add is fused into the norm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.heads * d, bias=config.bias)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=config.bias)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=config.bias)
        self.o_proj = nn.Linear(self.heads * d, h, bias=config.bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor | None, max_seqlen: int) -> Tensor:
        b, s, _ = x.shape
        hq, hk = self.heads, self.kv_heads
        qkv = packed_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        qk, v = qkv.view(b, s, hq + 2 * hk, self.head_dim).split([hq + hk, hk], dim=2)
        # q and k are adjacent heads of the one output: one rotary pass turns both
        if cu_seqlens is None:
            q, k = ops.apply_rotary(qk, cos, sin).split([hq, hk], dim=2)
            out = ops.flash_attn_func(q, k, v, causal=True)
        else:  # one packed row: (total, heads, head_dim) with per-document positions
            qk = ops.apply_rotary(qk[0], cos, sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            q, k = qk.split([hq, hk], dim=1)
            out = ops.flash_attn_varlen_func(q, k, v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        return self.o_proj(out.reshape(b, s, hq * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.swiglu_packed(packed_linear(x, (self.gate_proj, self.up_proj))))


class DecoderLayer(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, residual: Tensor | None, cos, sin, cu_seqlens, max_seqlen) -> tuple[Tensor, Tensor]:
        """x: the previous sublayer's output (or the embeddings when residual is None). Returns this
        layer's MLP output and the residual stream before it; the next norm adds them (fused)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        attn = self.self_attn(h, cos, sin, cu_seqlens, max_seqlen)
        h, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(h), residual


class InternLMModel(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class InternLMForCausalLM(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = InternLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rotary_tables(config)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.apply(self._init)

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
        if max_seqlen > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {max_seqlen} tokens exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        cos, sin = self.rotary_cos, self.rotary_sin
        x, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, residual = checkpoint(layer, x, residual, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x, residual = layer(x, residual, cos, sin, cu_seqlens, max_seqlen)
        h, _ = self.model.norm(x, residual)
        return h

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        return_logits: bool = False,
    ) -> CausalLMOutput:
        h = self.hidden_states(input_ids, cu_seqlens)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(h))
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(input_ids.shape)}")
        target = labels[:, 1:].clone()
        if cu_seqlens is not None:  # a document's last token does not predict the next document
            ends = cu_seqlens[1:-1].long() - 1
            target[0, ends[(ends >= 0) & (ends < target.shape[1])]] = -100
        hs = h[:, :-1].reshape(-1, h.shape[-1])
        loss = ops.fused_linear_cross_entropy(hs, self.lm_head.weight, target.reshape(-1))
        logits = self.lm_head(h) if return_logits else None
        return CausalLMOutput(loss=loss, logits=logits)

    # -- generation (internlm_fast.infer): KV-cache prefill/decode, sampling, chat --------------

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        stop_strings: str | list[str] | None = None,
        tokenizer=None,
    ) -> Tensor:
        """input_ids (batch, seqlen) followed by the new ids, as transformers' generate returns them
        (see internlm_fast.infer.model_api.generate)."""
        from internlm_fast.infer.model_api import generate

        return generate(
            self,
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
        )

    def chat(self, tokenizer, query: str, history: list[tuple[str, str]] = [], **gen) -> tuple[str, list]:  # noqa: B006
        """InternLM's chat: (response, history + [(query, response)]); defaults in infer.chat.CHAT_DEFAULTS."""
        from internlm_fast.infer.chat import chat

        return chat(self, tokenizer, query, history, **gen)

    def stream_chat(self, tokenizer, query: str, history: list[tuple[str, str]] = [], **gen):  # noqa: B006
        """Yields (response so far, history + [(query, response so far)]) as the response grows."""
        from internlm_fast.infer.chat import stream_chat

        return stream_chat(self, tokenizer, query, history, **gen)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> InternLMForCausalLM:
        """A model folder, transformers LLaMA/InternLM folder or checkpoint: see model.pretrained.load_pretrained."""
        from .pretrained import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB", tokenizer=None) -> Path:
        """This model (and the tokenizer, if given) as a transformers LLaMA folder: see
        model.pretrained.save_pretrained."""
        from .pretrained import save_pretrained

        return save_pretrained(self, path, max_shard_size=max_shard_size, tokenizer=tokenizer)
