"""The storage of a KV cache: a pool of fixed-size blocks (pages) of tokens, and a block table naming
each sequence's blocks in order (flash-attn's `block_table`, vLLM's PagedAttention). The model's
forward with a cache (InternLMForCausalLM.forward_cached) fills it and reads it.

Each layer holds one tensor (num_blocks, page, 2, kv_heads, head_dim): a token's keys and values sit
side by side, so one pass writes both (the fused rotary + append kernel), and `keys[layer]` /
`values[layer]` are (num_blocks, page, kv_heads, head_dim) views, the paged layout
flash_attn_with_kvcache reads. The live sequences are always the first `batch` rows of the block
table and of `lens`.

`KVCache.for_model` gives each sequence one block of max_len tokens (batch generation, where every
length is known up front): `keep` then drops finished sequences by reordering table rows, no copy.
The server gives sequences small blocks from a shared pool as they grow (serve/block_pool.py).
"""

from __future__ import annotations

import torch

from internlm_fast.model import InternLMForCausalLM

KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_kv_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A cache dtype: torch.float32/bfloat16/float16 or its name ("fp32", "bf16", "fp16")."""
    if isinstance(dtype, str) and dtype in KV_DTYPES:
        return KV_DTYPES[dtype]
    if dtype not in KV_DTYPES.values():
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)} (or the torch dtype), got {dtype!r}")
    return dtype


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        page: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or page < 1:
            raise ValueError(f"a KV cache needs num_blocks >= 1 and page >= 1, got {num_blocks}, {page}")
        self.page = page
        self.num_blocks = num_blocks
        self.kv = [
            torch.empty(num_blocks, page, 2, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.keys = [kv[:, :, 0] for kv in self.kv]
        self.values = [kv[:, :, 1] for kv in self.kv]
        self.flat = [kv.view(-1, *kv.shape[2:]) for kv in self.kv]  # block i's row r: flat row i * page + r
        self.device = torch.device(device)
        self.set_rows(torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int64))

    @classmethod
    def for_model(
        cls, model: InternLMForCausalLM, batch: int, max_len: int, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty cache for `batch` sequences of up to max_len tokens, one block each, on the model's
        device, in `dtype` (default: the model's; torch.bfloat16 halves an fp32 model's cache)."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs batch >= 1 and max_len >= 1, got batch {batch}, max_len {max_len}")
        cache = cls.pool_for_model(model, batch, max_len, dtype)
        cache.set_rows(torch.arange(batch, dtype=torch.int32)[:, None], torch.zeros(batch, dtype=torch.int64))
        return cache

    @classmethod
    def pool_for_model(
        cls, model: InternLMForCausalLM, num_blocks: int, page: int, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A pool of num_blocks blocks of `page` tokens with no sequences yet (set_rows assigns them), in
        `dtype` (default: the model's)."""
        c, w = model.config, model.lm_head.weight
        dtype = w.dtype if dtype is None else check_kv_dtype(dtype)
        return cls(c.num_hidden_layers, num_blocks, page, c.num_key_value_heads, c.head_dim, dtype, w.device)

    @property
    def max_len(self) -> int:
        """The tokens a sequence can hold: its block table row's capacity."""
        return self.block_table.shape[1] * self.page

    def set_rows(self, block_table: torch.Tensor, lens: torch.Tensor) -> None:
        """The sequences of the next step: block_table int32 (batch, max_blocks) and the tokens each
        caches already, lens int64 (batch,). Host tensors are moved to the cache's device."""
        self.block_table = block_table.to(self.device, torch.int32)
        self.lens = lens.to(self.device, torch.int64)
        self.batch = block_table.shape[0]

    def keep(self, rows: list[int]) -> None:
        """Keep only these live rows (ascending), moved to the front in this order. Their blocks stay
        where they are: only the block table and the lengths are reordered."""
        if any(b >= a for a, b in zip(rows[1:], rows)) or (rows and not 0 <= rows[0] <= rows[-1] < self.batch):
            raise ValueError(f"rows must be ascending indices of live sequences (< {self.batch}), got {rows}")
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.block_table = self.block_table[index]
        self.lens = self.lens[index]
        self.batch = len(rows)
