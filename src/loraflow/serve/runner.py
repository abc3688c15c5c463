"""The model runner: a step's plan through the model, and the batch's tokens out of its logits.

Decode-only steps of additive adapters replay CUDA graphs (``serve/decode_graphs.py``); other
steps run eagerly over the step's packed tokens (``serve/packing.py``). The tokens of the rows
without penalties or log-probabilities come from the device in one transfer: one argmax for
the greedy ones, ``sample_rows`` for the sampled ones.
"""

from __future__ import annotations

import torch

from loraflow.serve.bank import AdapterBank
from loraflow.serve.decode_graphs import BUCKETS, DecodeGraphs
from loraflow.serve.kv_cache import KVCache
from loraflow.serve.llama import Llama, paged_decode_attention
from loraflow.serve.packing import pack
from loraflow.serve.request import Request
from loraflow.serve.sampling import sample_rows


class ModelRunner:
    def __init__(self, model: Llama, kv: KVCache, bank: AdapterBank, device: torch.device,
                 decode_graphs: bool | None, max_batch_tokens: int, max_len: int):  # fmt: skip
        self.model, self.kv, self.bank, self.device = model, kv, bank, device
        if decode_graphs is None:
            decode_graphs = device.type == "cuda" and paged_decode_attention is not None
        self.graphs = (
            DecodeGraphs(model, kv, bank, min(max_batch_tokens, BUCKETS[-1]), max_len, capture=device.type == "cuda")
            if decode_graphs
            else None
        )

    def batch(self, plan: list[tuple[Request, int]]):
        """The step's packed tokens and attention metadata (``serve/packing.py``)."""
        return pack(plan, self.bank, self.kv.block_size, self.kv.zero_row, self.device, self.model.lm_head.weight.dtype)

    def forward(self, plan: list[tuple[Request, int]]) -> tuple[torch.Tensor, list[tuple[int, Request]], str]:
        """The logits of the plan's last tokens, (row, request) for each request whose prompt
        is done with this step (those get a token), and how the step ran: "graph" (a captured
        decode step), "decode" or "prompt" (eager, without or with prompt tokens)."""
        flora = any(r.slot >= 0 and self.bank.slot_flora[r.slot] for r, _ in plan)  # graphs hold additive slots
        decode = all(n == 1 for _, n in plan)
        if self.graphs is not None and not flora and len(plan) <= self.graphs.size and decode:
            logits = self.graphs.run([(r.token(r.computed), r.computed, r.slot, r.blocks) for r, _ in plan])
            return logits, [(i, r) for i, (r, _) in enumerate(plan) if r.computed + 1 == r.n_tokens], "graph"
        batch, sample_from = self.batch(plan)
        with torch.inference_mode():
            logits = self.model(batch, self.kv.layers)
        return logits, list(enumerate(sample_from)), "decode" if decode else "prompt"

    def tokens(self, logits: torch.Tensor, rows: list[tuple[int, Request]]) -> tuple[dict, list | None]:
        """The tokens of the rows without penalties or log-probabilities, greedy (one argmax) and
        sampled (``sample_rows``) for the whole batch on the device, and every row's finiteness,
        in one transfer to the host: ({row: token}, [finite a row])."""
        fast = [(row, r) for row, r in rows if r.params.batched_greedy or r.params.batched_sample]
        if not fast:
            return {}, None
        drawn = [(row, r) for row, r in fast if r.params.batched_sample]
        # a row's sum is finite iff all its logits are (NaN and ±inf propagate; logits are far
        # from overflowing): one pass over the logits instead of isfinite's mask and all()
        # (benchmarks/results/engine-host-profile-cpu.txt: the step's host time halved on a CPU)
        parts = [logits.argmax(-1), torch.isfinite(logits.sum(-1)).long()]
        if drawn:
            idx = [row for row, _ in drawn]
            parts.append(sample_rows(logits[idx], [r.params for _, r in drawn], [r.generator for _, r in drawn]))
        flat, n = torch.cat(parts).tolist(), len(logits)
        token_of = {row: flat[row] for row, r in fast if r.params.batched_greedy}
        token_of.update({row: t for (row, _), t in zip(drawn, flat[2 * n :])})
        return token_of, flat[n : 2 * n]
