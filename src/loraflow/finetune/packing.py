"""Padding-free batches: a step's rows packed end to end into one sequence, each row attending
only to itself (``models/varlen_attention.py``), so no layer computes on padding.

A padded batch of N rows costs N · max L_i tokens in every linear layer; a packed one Σ L_i.
The losses are those of the padded batch, row by row: classification reads each row's last
token, the causal LM scores each row's own next tokens (never across a row boundary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.finetune.data import IGNORE, Example
from loraflow.finetune.model import HEAD, plain_head
from loraflow.losses import linear_cross_entropy


def pack(examples: list[Example]) -> dict:
    """One packed row: input_ids and position_ids (1, T), ``cu_seq_lens`` (N+1,) int32 offsets,
    ``max_length`` (int), ``row`` (T,) each token's row, and labels (1, T) or classes (N, heads)."""
    assert examples, "pack needs at least one example"
    lengths = [len(ex.input_ids) for ex in examples]
    cu = torch.zeros(len(examples) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    batch = {
        "input_ids": torch.tensor([t for ex in examples for t in ex.input_ids]).unsqueeze(0),  # (1, T)
        "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),  # (1, T): 0.. per row
        "row": torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(lengths)),  # (T,)
        "cu_seq_lens": cu,
        "max_length": max(lengths),
    }
    if examples[0].labels is not None:
        # position t predicts token t+1 of its own row: a row's last token predicts nothing
        labels = [lab[1:] + [IGNORE] for lab in (ex.labels for ex in examples)]
        batch["labels"] = torch.tensor([t for lab in labels for t in lab]).unsqueeze(0)  # (1, T): shifted
    else:
        batch["classes"] = torch.tensor([ex.classes for ex in examples], dtype=torch.long)  # (N, heads)
    return batch


def _varlen_kwargs(batch: dict) -> dict:
    cu = batch["cu_seq_lens"]
    return {
        "position_ids": batch["position_ids"],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": batch["max_length"],
        "max_length_k": batch["max_length"],
        "use_cache": False,  # training: no key/value cache (and transformers then sees the packing)
    }


def packed_classify(model: nn.Module, batch: dict) -> torch.Tensor:
    """logits = W_score h_last for each packed row: its last token is at cu_seq_lens[i+1] - 1."""
    body = getattr(model, model.base_model_prefix)
    hidden = body(input_ids=batch["input_ids"], **_varlen_kwargs(batch)).last_hidden_state[0]  # (T, d)
    pooled = hidden[batch["cu_seq_lens"][1:].long() - 1]  # (N, d)
    head = getattr(model, HEAD)
    return F.linear(pooled.to(head.weight.dtype), head.weight, head.bias)  # (N, Σ K_j)


def packed_token_losses(model: nn.Module, batch: dict) -> torch.Tensor:
    """Each row's summed next-token cross-entropy over its labelled tokens: (N,)."""
    head = plain_head(model)
    if head is not None:  # never all the logits in float32
        body = getattr(model, model.base_model_prefix)
        hidden = body(input_ids=batch["input_ids"], **_varlen_kwargs(batch)).last_hidden_state[0]  # (T, d)
        nll = linear_cross_entropy(hidden, head.weight, batch["labels"][0])  # (T,)
    else:
        logits = model(input_ids=batch["input_ids"], **_varlen_kwargs(batch)).logits[0]  # (T, V)
        nll = F.cross_entropy(logits.float(), batch["labels"][0], ignore_index=IGNORE, reduction="none")  # (T,)
    rows = len(batch["cu_seq_lens"]) - 1
    return nll.new_zeros(rows).index_add_(0, batch["row"], nll)  # (N,)
