"""The storage of a KV cache: preallocated per sequence, shrinking as sequences finish. The model's
forward with a cache (InternLMForCausalLM.forward_cached) fills it and reads it.

Each layer holds one tensor (batch, max_len, 2, kv_heads, head_dim): a token's keys and values sit
side by side, so one pass writes both (the fused rotary + append kernel), and `keys[layer]` /
`values[layer]` are (batch, max_len, kv_heads, head_dim) views, the layout flash_attn_with_kvcache
reads (strided tokens, contiguous heads). The live sequences are always the first `batch` rows:
`keep` moves the survivors to the front, so finished sequences stop costing attention and GEMM rows.
"""

from __future__ import annotations

import torch

from internlm_fast.model import InternLMForCausalLM


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs batch >= 1 and max_len >= 1, got batch {batch}, max_len {max_len}")
        self.max_len = max_len
        self.batch = batch
        self.kv = [
            torch.empty(batch, max_len, 2, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        # flat rows of kv[layer].view(-1, 2, kv_heads, head_dim): sequence b's token t is row b * max_len + t
        self.row_starts = torch.arange(batch, device=device) * max_len
        self.lens = torch.zeros(batch, dtype=torch.int64, device=device)  # tokens cached per sequence
        self._views()

    @classmethod
    def for_model(cls, model: InternLMForCausalLM, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` sequences of up to max_len tokens, in the model's dtype and device."""
        c, w = model.config, model.lm_head.weight
        return cls(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim, w.dtype, w.device)

    def _views(self) -> None:
        b = self.batch
        self.keys = [kv[:b, :, 0] for kv in self.kv]
        self.values = [kv[:b, :, 1] for kv in self.kv]
        self.flat = [kv.view(-1, *kv.shape[2:]) for kv in self.kv]

    def keep(self, rows: list[int]) -> None:
        """Keep only these live rows (ascending), moved to the front in this order."""
        if any(b >= a for a, b in zip(rows[1:], rows)) or (rows and not 0 <= rows[0] <= rows[-1] < self.batch):
            raise ValueError(f"rows must be ascending indices of live sequences (< {self.batch}), got {rows}")
        lens = self.lens.tolist()
        for dst, src in enumerate(rows):
            if dst != src:  # dst < src: a source row is never overwritten before it is read
                n = lens[src]
                for kv in self.kv:
                    kv[dst, :n].copy_(kv[src, :n])
                self.lens[dst] = n
        self.batch = len(rows)
        self._views()
