"""Decode-only steps through fixed buffers, captured in CUDA graphs.

A decode step (one new token per running sequence) has the same shapes from one step to
the next once its batch is padded to a bucket size: the token ids, positions, adapter
slots, KV-cache rows, context lengths and block tables are copied into fixed device
buffers, and the whole forward (every layer's GEMMs, the per-row LoRA kernels and the paged
attention kernel) replays from one CUDA graph per bucket: one launch instead of a thousand.
Padding rows read and write the KV cache's spare block and use no adapter.

Graphs are keyed by (bucket, adapter layout, adapter path, kernel): with no adapter in the batch
the layers run the base GEMMs alone; with adapters, the layers that some slot adapts add
B_s A_s x through the per-row Triton kernels (on CUDA always: they read only the rows in
use and measured faster than the whole bank's dense matmuls, ``AdapterBank.dense_pays``),
or, on the CPU when the batch's adapters hold at least half the bank's rows, through two
dense matmuls over the whole bank and a per-token mask of its own slot's rows
(``TokenSlots.slot_mask``, refreshed in a fixed buffer before each step). A new layout (a
layer adapted for the first time) captures anew. A FLoRA row (multiplicative) has no slot
in the additive path: with FLoRA rows in the step, each layer's GEMM runs over their r scaled
copies a_k ∘ x and one row for every other token (``bank.RowCopies``: token, bank row and
validity of each GEMM row, in a buffer padded to a bucket that the graph's key holds; the
first row and row count of each token). Without CUDA (tests, Triton's interpreter) the same
buffers and kernels run eagerly.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch

from loraflow.serve.bank import AdapterBank, RowCopies, TokenSlots
from loraflow.serve.kv_cache import KVCache
from loraflow.serve.llama import Batch, Llama

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def bucket(n: int) -> int:
    return next(b for b in BUCKETS if b >= n)


def rows_bucket(n: int) -> int:
    """GEMM rows a graph with FLoRA rows holds (``bank.RowCopies``): a batch bucket up to its
    largest, a power of two past it."""
    return bucket(n) if n <= BUCKETS[-1] else 1 << (n - 1).bit_length()


class DecodeGraphs:
    def __init__(
        self, model: Llama, kv: KVCache, bank: AdapterBank, max_batch: int, max_len: int, capture: bool = True
    ):
        if max_batch > BUCKETS[-1]:
            raise ValueError(f"decode graphs hold at most {BUCKETS[-1]} sequences, got max_batch={max_batch}")
        self.model, self.kv, self.bank, self.capture = model, kv, bank, capture
        dev = kv.layers[0][0].device
        self.size = bucket(max_batch)
        width = -(-max_len // kv.block_size)
        # the step's inputs on the host, in page-locked memory on CUDA: their copies to the device
        # are queued (non_blocking) instead of waited for; the next step waits for them (an event)
        # before it rewrites the buffers, done by then as a rule (the step's tokens came back)
        pin = dev.type == "cuda"
        self._copied = torch.cuda.Event() if pin else None
        self._host = torch.zeros(7, self.size, dtype=torch.long, pin_memory=pin)
        self._host_table = torch.zeros(self.size, width, dtype=torch.int32, pin_memory=pin)
        # tokens, positions, additive slots, KV rows, lengths; with FLoRA rows, each token's
        # first GEMM row and row count (bank.RowCopies)
        self.host = self._host.numpy()
        self.host_table = self._host_table.numpy()
        self.inputs = torch.zeros(7, self.size, dtype=torch.long, device=dev)
        # with FLoRA rows: each GEMM row's token, bank row and validity; at most r_max a token
        most = rows_bucket(self.size * max(1, bank.r_max))
        self._host_copies = torch.zeros(3, most, dtype=torch.long, pin_memory=pin)
        self.host_copies = self._host_copies.numpy()
        self.copies = torch.zeros(3, most, dtype=torch.long, device=dev)
        self.copies_valid = torch.zeros(most, 1, dtype=kv.layers[0][0].dtype, device=dev)
        self.table = torch.zeros(self.size, width, dtype=torch.int32, device=dev)
        self.slots32 = torch.zeros(self.size, dtype=torch.int32, device=dev)  # the Triton kernels' slot type
        self.mask = torch.zeros(self.size, bank.n_slots * bank.r_max, dtype=kv.layers[0][0].dtype, device=dev)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        # decode LoRA launches: "siblings" (q/k/v and gate/up share a shrink and an expand
        # launch: multi/triton_siblings.py; o and down one of each), "rows" (a shrink and an
        # expand a layer) or "fused" (one launch a layer). On an H200, a Llama-2-7B step with
        # 64 adapters replays in 12.92, 13.49 and 14.26 ms (results/engine-steps-h200-v7.json)
        self.kernel = "siblings"
        # the paged attention kernel's tiling: programs per (sequence, KV head) and warps each.
        # On an H100, Llama-2-7B, 64 sequences: 4 x 2 against 1 x 4 took 105 against 110 us a
        # layer at 176 positions and 456 against 554 us at 1,088 (decode_attention.py), and the
        # engine's step at 1,024 + 48 tokens 21.2 against 23.9 ms (base) and 23.7 against 27.1 ms
        # (64 adapters) (benchmarks/scripts/engine_steps.py --attention 1x4,4x2). Without CUDA
        # (Triton's interpreter runs the programs one by one) one program a context is faster
        self.attention_splits, self.attention_warps = (4, 2) if dev.type == "cuda" else (1, 4)
        self.steps = 0  # decode steps run through this path
        self.captures, self.capture_seconds = 0, 0.0  # graphs captured (warm-up runs included) and their time
        self.paths: Counter = Counter()  # ... by adapter path: None, "rows", "mask"

    def _batch(self, n: int, path: str | None, copies: int = 0) -> Batch:
        """``path``: None (no additive adapters), "rows" (Triton kernels) or "mask" (the whole
        bank); ``copies``: the GEMM rows with FLoRA rows in the step, 0 without."""
        tokens, positions, slots, rows, lengths, start, count = self.inputs[:, :n]
        ts = TokenSlots(
            self.slots32[:n] if path == "rows" else slots,
            [0] if path else [],
            [],
            variant=self.kernel if path == "rows" else None,
            mask=self.mask[:n] if path == "mask" else None,
            copies=RowCopies(*self.copies[:2, :copies], self.copies_valid[:copies], start, count) if copies else None,
        )
        return Batch(
            tokens, positions, ts, rows, block_table=self.table[:n], seq_lens=lengths, block_size=self.kv.block_size,
            attention_splits=self.attention_splits, attention_warps=self.attention_warps,
        )  # fmt: skip

    @torch.inference_mode()
    def run(self, steps: list[tuple[int, int, int, list[int]]], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (n, vocab) for ``steps``: per sequence (token, position, slot, block table);
        with ``tokens`` (n,) on the device, the sequences' tokens are those instead."""
        n, bs = len(steps), self.kv.block_size
        size = bucket(n)
        h, ht = self.host, self.host_table
        trash = self.kv.trash_block
        if self._copied is not None:
            self._copied.synchronize()
        flora = self.bank.slot_flora
        for i, (token, pos, slot, blocks) in enumerate(steps):
            additive = -1 if slot >= 0 and flora[slot] else slot
            h[:5, i] = (token, pos, additive, blocks[pos // bs] * bs + pos % bs, pos + 1)
            ht[i, : len(blocks)] = blocks
        h[:5, n:size] = np.array((0, 0, -1, trash * bs, 1))[:, None]
        ht[n:size, 0] = trash
        copies = 0
        if any(s[2] >= 0 and flora[s[2]] for s in steps):  # the GEMM rows: r copies a FLoRA row, 1 the others
            tok, row, h[5, :size], h[6, :size] = self.bank.flora_rows([s[2] for s in steps] + [-1] * (size - n))
            m, copies = len(tok), rows_bucket(len(tok))
            hc = self.host_copies
            hc[0, :m], hc[1, :m], hc[2, :m] = tok, row, 1
            hc[:, m:copies] = np.array((0, self.bank.ones_row, 0))[:, None]  # padding rows: no token's, valid 0
        self.inputs.copy_(self._host, non_blocking=True)  # whole (contiguous): 7 x 512 at most
        self.table[:size].copy_(self._host_table[:size], non_blocking=True)
        if copies:
            self.copies[:, :copies].copy_(self._host_copies[:, :copies], non_blocking=True)
            self.copies_valid[:copies, 0].copy_(self.copies[2, :copies])
        if tokens is not None:  # the previous step's, still on the device
            self.inputs[0, :n].copy_(tokens)
        if self._copied is not None:
            self._copied.record()
        self.slots32[:size].copy_(self.inputs[2, :size])  # one cast a step, not one a layer
        used = {s[2] for s in steps if s[2] < 0 or not flora[s[2]]} - {-1}  # the additive slots
        path = None if not used else "mask" if self.bank.dense_pays(used) else "rows"
        if path == "mask":
            TokenSlots.slot_mask(
                self.inputs[2, :size], self.bank.n_slots, self.bank.r_max, self.mask.dtype, out=self.mask[:size]
            )
        self.steps += 1
        self.paths[path] += 1
        if not self.capture:
            return self.model(self._batch(size, path, copies), self.kv.layers)[:n]
        key = self.key(size, path, copies)
        if key not in self.graphs:
            self.graphs = {k: v for k, v in self.graphs.items() if k[1] in (None, self.bank.layout)}
            start = time.perf_counter()
            self.graphs[key] = self._capture(size, path, copies)
            self.captures += 1
            self.capture_seconds += time.perf_counter() - start
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]

    def key(self, size: int, path: str | None, copies: int = 0) -> tuple:
        """The captured graph of a bucket: adapter layout and path, LoRA kernel, attention
        tiling, FLoRA copies."""
        kernel = self.kernel if path == "rows" else None
        layout = self.bank.layout if path or copies else None
        return size, layout, path, kernel, (self.attention_splits, self.attention_warps), copies

    def _capture(self, size: int, path: str | None, copies: int = 0) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (compiles the Triton kernels), then capture. The buffers
        hold this step's inputs: running them writes the same keys and values twice."""
        batch = self._batch(size, path, copies)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(batch, self.kv.layers)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread-local: the adapter registry's loader thread may copy to the device meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self.model(batch, self.kv.layers)
        return graph, logits
