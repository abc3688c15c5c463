"""One engine step's batch: the new tokens of every scheduled sequence packed side by side,
with where their keys and values go in the paged cache and what each may attend to.

A plan is a list of (request, n): n new tokens of that request this step (1 for a decode,
more for a prompt chunk). Token t of sequence j sits at packed index first_j + t, position
computed_j + t, and cache row table_j[p // block] · block + p % block. Decode sequences and
prompt chunks attend in separate groups, each padded to its own longest run of new tokens
and context, so one long chunk does not pad every decode query to its length.

Per-sequence numbers and block tables come from Python (small); the index and mask tensors
are built on the device.
"""

from __future__ import annotations

import itertools

import torch

from loraflow.serve.bank import AdapterBank, TokenSlots
from loraflow.serve.llama import AttnGroup, Batch


def pack(plan, bank: AdapterBank, block_size: int, zero_row: int, device, dtype) -> tuple[Batch, list]:
    """(the step's Batch, the requests whose next token is sampled from it, in logit order).
    ``zero_row``: a KV-cache row that is never written (``KVCache.zero_row``)."""
    bs = block_size
    tokens, slots, logit_index, sample_from = [], [], [], []
    for req, n in plan:
        tokens += req.ids[req.computed : req.computed + n]
        slots += [req.slot] * n
        if req.computed + n == req.n_tokens:  # the prompt is all in: a new token comes next
            logit_index.append(len(tokens) - 1)
            sample_from.append(req)
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)
    n_new = as_t([n for _, n in plan])  # (S,)
    done = as_t([r.computed for r, _ in plan])  # (S,) cached before
    width = max(len(r.blocks) for r, _ in plan)
    table = as_t([r.blocks + [0] * (width - len(r.blocks)) for r, _ in plan])  # (S, blocks)
    start = torch.cumsum(n_new, 0) - n_new  # first packed token of each
    seq = torch.repeat_interleave(torch.arange(len(plan), device=device), n_new)  # (N,) sequence of each token
    i = torch.arange(len(tokens), device=device) - start[seq]  # (N,) index among its new tokens
    positions = done[seq] + i
    cache_index = table[seq, positions // bs] * bs + positions % bs
    groups = [
        attn_group(members, plan, start, n_new, done, table, bs, zero_row)
        for members in ([j for j, (_, n) in enumerate(plan) if n == 1], [j for j, (_, n) in enumerate(plan) if n > 1])
        if members
    ]
    batch = Batch(
        as_t(tokens), positions, TokenSlots.build(slots, bank, device, dtype), cache_index, groups, as_t(logit_index)
    )
    return batch, sample_from


def attn_group(members: list[int], plan, start, n_new, done, table, block_size: int, zero_row: int) -> AttnGroup:
    """Attention indices for the sequences ``members`` (positions in ``plan``) of a step,
    padded to their own longest new-token run and context; padded context reads ``zero_row``."""
    dev, bs = table.device, block_size
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=dev)
    m = as_t(members)
    q_max = max(plan[j][1] for j in members)
    ctx_max = max(plan[j][0].computed + plan[j][1] for j in members)
    start, n_new, done, table = start[m], n_new[m], done[m], table[m]
    width = table.shape[1]
    qi = torch.arange(q_max, device=dev)
    kj = torch.arange(ctx_max, device=dev)
    q_index = torch.where(qi[None] < n_new[:, None], start[:, None] + qi[None], 0)  # (S, q_max)
    kv_index = table.gather(1, (kj // bs).clamp_max(width - 1).expand(len(members), -1)) * bs + kj % bs
    kv_index = torch.where(kj[None] < (done + n_new)[:, None], kv_index, zero_row)  # (S, ctx_max)
    real_q = qi[None, :, None] < n_new[:, None, None]
    causal = kj[None, None, :] <= done[:, None, None] + qi[None, :, None]
    mask = (real_q & causal) | (~real_q & (kj == 0)[None, None, :])  # padded queries see key 0
    first = list(itertools.accumulate((n for _, n in plan), initial=0))  # packed index of each one's first token
    tokens = [first[j] + k for j in members for k in range(plan[j][1])]
    out_index = [row * q_max + k for row, j in enumerate(members) for k in range(plan[j][1])]
    return AttnGroup(as_t(tokens), q_index, kv_index, mask[:, None], as_t(out_index))
