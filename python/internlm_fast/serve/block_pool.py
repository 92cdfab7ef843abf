"""Which KV-cache blocks are free, which are shared, and which hold a reusable prefix.

Every sequence holds its blocks by reference count. A block that is full (all of its tokens written)
can be published under a hash of its tokens and of everything before them (vLLM's prefix caching):
a later prompt that starts with the same tokens takes the same blocks, shared, instead of computing
them again. A published block whose last holder finished stays in the pool as a cached block, in
least-recently-used order: it is reused by the next prompt with that prefix, or evicted when a block
is needed and no free one is left, or when more than `max_cached` cached blocks would be kept.

Reservations make sure no running sequence ever runs out of blocks: a sequence is admitted only when
the blocks it may still need (prompt and max_tokens) are available, and they are counted as taken
until it finishes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(tokens: Sequence[int], page: int, stop: int, start: int = 0, prev: int = 0) -> list[int]:
    """The chain hashes of full blocks start..stop-1 of tokens, `prev` being block start-1's (0 for
    none): block i's hash covers tokens [0, (i + 1) * page), so equal hashes mean equal prefixes."""
    out, h = [], prev
    for i in range(start, stop):
        h = hash((h, tuple(tokens[i * page : (i + 1) * page])))
        out.append(h)
    return out


class BlockPool:
    def __init__(self, num_blocks: int, page: int, max_cached: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks, self.page = num_blocks, page
        self.max_cached = num_blocks if max_cached is None else max_cached
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self.refs = [0] * num_blocks
        self.by_hash: dict[int, int] = {}  # published block of each prefix hash
        self.hash_of: dict[int, int] = {}  # block -> its published hash
        self.cached: OrderedDict[int, None] = OrderedDict()  # published, unreferenced: LRU first
        self.reserved = 0  # blocks promised to admitted sequences, not yet allocated

    @property
    def available(self) -> int:
        """Blocks a new reservation may take: free ones and evictable cached ones, less reservations."""
        return len(self.free) + len(self.cached) - self.reserved

    @property
    def used(self) -> int:
        """Blocks held by sequences (shared ones once)."""
        return self.num_blocks - len(self.free) - len(self.cached)

    def match_prefix(self, tokens: Sequence[int], limit: int) -> tuple[list[int], int]:
        """The published blocks that hold the longest prefix of `tokens`, at most `limit` blocks, each
        referenced for the caller, and the chain hash of the last one (0 for none)."""
        blocks, chain = [], 0
        for h in block_hashes(tokens, self.page, limit):
            block = self.by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
            chain = h
        for block in blocks:
            self._ref(block)
        return blocks, chain

    def _ref(self, block: int) -> None:
        if self.refs[block] == 0:
            self.cached.pop(block, None)
        self.refs[block] += 1

    def reserve(self, n: int) -> bool:
        if n > self.available:
            return False
        self.reserved += n
        return True

    def allocate(self) -> int:
        """One block out of a reservation: a free one, else the least recently used cached one."""
        if self.reserved <= 0:
            raise RuntimeError("allocate() without a reservation")
        if not self.free:
            self._evict(next(iter(self.cached)))
        self.reserved -= 1
        block = self.free.pop()
        self.refs[block] = 1
        return block

    def _evict(self, block: int) -> None:
        del self.cached[block]
        del self.by_hash[self.hash_of.pop(block)]
        self.free.append(block)

    def publish(self, block: int, h: int) -> None:
        """Makes a full block findable by its prefix hash (the first block published for a hash wins)."""
        if block not in self.hash_of and h not in self.by_hash:
            self.by_hash[h] = block
            self.hash_of[block] = h

    def release(self, blocks: Sequence[int], unreserve: int = 0) -> None:
        """A sequence's blocks and its unused reservation, when it finishes or is cancelled."""
        self.reserved -= unreserve
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block]:
                continue
            if block in self.hash_of:
                self.cached[block] = None
            else:
                self.free.append(block)
        while len(self.cached) > self.max_cached:
            self._evict(next(iter(self.cached)))

    def clear_cache(self) -> None:
        """Evicts every cached block (nothing referenced is touched)."""
        while self.cached:
            self._evict(next(iter(self.cached)))
