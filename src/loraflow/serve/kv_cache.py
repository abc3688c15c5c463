"""The paged KV cache: per layer, K and V as (blocks · block_size, kv_heads, head_dim) rows;
each sequence owns a list of blocks (its block table), allocated from a memory budget.
One extra block, never handed out, takes the writes of the padding rows of a CUDA-graph
decode batch; one extra row, never written, stays zero: padded context positions read it,
so a masked key or value is never a stale NaN or inf left by an earlier request (masking
gives it weight 0, but 0 · inf is NaN)."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        budget_bytes: int,
        block_size: int = 16,
        dtype=torch.float32,
        device="cpu",
    ):
        elt = torch.tensor([], dtype=dtype).element_size()
        per_block = 2 * n_layers * block_size * n_kv_heads * head_dim * elt
        self.n_blocks = int(budget_bytes // per_block)
        if self.n_blocks < 2:
            raise ValueError(
                f"a KV-cache budget of {budget_bytes} bytes holds {self.n_blocks} blocks of "
                f"{per_block} bytes; give at least {2 * per_block} bytes"
            )
        self.block_size = block_size
        self.trash_block = self.n_blocks  # padding rows write here
        self.zero_row = (self.n_blocks + 1) * block_size  # padded context reads here
        rows = self.zero_row + 1
        self.layers = [
            (
                torch.zeros(rows, n_kv_heads, head_dim, dtype=dtype, device=device),
                torch.zeros(rows, n_kv_heads, head_dim, dtype=dtype, device=device),
            )
            for _ in range(n_layers)
        ]
        self.free = list(range(self.n_blocks - 1, -1, -1))

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def grow(self, table: list[int], n_tokens: int) -> bool:
        """Extend ``table`` to hold ``n_tokens``; False (and no change) if blocks run out."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > len(self.free):
            return False
        for _ in range(max(0, need)):
            table.append(self.free.pop())
        return True

    def release(self, table: list[int]) -> None:
        self.free.extend(reversed(table))
        table.clear()
