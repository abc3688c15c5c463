"""The model runner: a step's plan through the model, and the batch's tokens out of its logits.

Decode-only steps replay CUDA graphs (``serve/decode_graphs.py``), FLoRA rows included; other
steps run eagerly over the step's packed tokens (``serve/packing.py``). The tokens of the rows
without penalties or log-probabilities come from the device in one transfer: one argmax for
the greedy ones, ``sample_rows`` for the sampled ones.

A decode step's tokens can also stay on the device (``launch_tokens``): the next decode step
of the same requests reads them there (``decode_after``) and is queued before the host reads
them (``StepTokens.read``), so that the host's work of one step overlaps the GPU's next
(``Engine._chain``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraflow.serve.bank import AdapterBank
from loraflow.serve.decode_graphs import BUCKETS, DecodeGraphs
from loraflow.serve.kv_cache import KVCache
from loraflow.serve.llama import Llama, paged_decode_attention
from loraflow.serve.packing import pack
from loraflow.serve.request import Request
from loraflow.serve.sampling import sample_rows


@dataclass
class StepTokens:
    """A decode step's tokens on their way to the host. ``rows``: (row, request), every row of
    the step; ``tokens`` (n,): each row's token on the device; ``host`` (2n,): the tokens and
    each row's finiteness, copied (page-locked, without waiting on CUDA) once ``ready``."""

    rows: list[tuple[int, Request]]
    tokens: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None

    def read(self) -> tuple[dict, list]:
        """({row: token}, [finite a row]): waits for the step on CUDA."""
        if self.ready is not None:
            self.ready.synchronize()
        flat, n = self.host.tolist(), len(self.tokens)
        return {row: flat[row] for row, _ in self.rows}, flat[n:]


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
        # two page-locked buffers for the tokens of in-flight steps (``launch_tokens``): a step's
        # copy lands in one while the host may still read the previous step's from the other
        n = 2 * (self.graphs.size if self.graphs is not None else 1)
        pin = device.type == "cuda"
        self._token_bufs = [torch.zeros(n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._token_events = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._flip = 0

    def batch(self, plan: list[tuple[Request, int]]):
        """The step's packed tokens and attention metadata (``serve/packing.py``)."""
        return pack(plan, self.bank, self.kv.block_size, self.kv.zero_row, self.device, self.model.lm_head.weight.dtype)

    def forward(self, plan: list[tuple[Request, int]]) -> tuple[torch.Tensor, list[tuple[int, Request]], str]:
        """The logits of the plan's last tokens, (row, request) for each request whose prompt
        is done with this step (those get a token), and how the step ran: "graph" (a captured
        decode step), "decode" or "prompt" (eager, without or with prompt tokens)."""
        decode = all(n == 1 for _, n in plan)
        if self.graphs is not None and len(plan) <= self.graphs.size and decode:
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

    def chainable(self, rows: list[tuple[int, Request]]) -> bool:
        """Whether a step's tokens can stay on the device (``launch_tokens``): every row drawn
        in the batch (no penalties, no log-probabilities) and a decode graph's batch."""
        fast = all(r.params.batched_greedy or r.params.batched_sample for _, r in rows)
        return fast and self.graphs is not None and len(rows) <= self.graphs.size

    def launch_tokens(self, logits: torch.Tensor, rows: list[tuple[int, Request]]) -> StepTokens:
        """The tokens of a decode step whose rows are all ``chainable``, left on the device with
        their copy to the host queued: (n,) argmax, the sampled rows put in by ``sample_rows``."""
        tokens = logits.argmax(-1)  # (n,)
        drawn = [(row, r) for row, r in rows if r.params.batched_sample]
        if drawn:
            idx = torch.tensor([row for row, _ in drawn], device=logits.device)
            sampled = sample_rows(logits[idx], [r.params for _, r in drawn], [r.generator for _, r in drawn])
            tokens = tokens.index_copy(0, idx, sampled)
        flat = torch.cat([tokens, torch.isfinite(logits.sum(-1)).long()])  # (2n,)
        host, ready = self._token_bufs[self._flip][: len(flat)], self._token_events[self._flip]
        self._flip ^= 1
        host.copy_(flat, non_blocking=ready is not None)
        if ready is not None:
            ready.record()
        return StepTokens(rows, tokens, host, ready)

    def decode_after(self, step: StepTokens, go_on: list[tuple[int, Request]]) -> torch.Tensor:
        """Logits of the decode step that follows ``step`` for ``go_on``, the (row, request) of
        its rows that go on (in its order), their newest tokens read from ``step.tokens`` on the device."""
        rows = [row for row, _ in go_on]
        tokens = step.tokens
        if len(rows) < len(tokens):  # some rows ended: the others' tokens, gathered
            tokens = tokens.index_select(0, torch.tensor(rows, device=tokens.device))
        return self.graphs.run([(0, r.computed, r.slot, r.blocks) for _, r in go_on], tokens=tokens)
