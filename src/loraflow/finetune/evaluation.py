"""Scoring a model on examples: the dev split during training, and ``loraflow eval``.

Causal LM: the mean next-token negative log-likelihood over the labelled tokens, and its
perplexity. Classification: each head's probabilities, scored with scikit-learn
(``evaluate/metrics.py``), and the joint accuracy of all heads.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from tqdm import tqdm

from loraflow.finetune.data import Example, collate
from loraflow.finetune.model import classify, token_losses

SUMMARY = ("accuracy", "top_k_accuracy", "macro_f1", "micro_f1", "macro_auc")


def _batches(examples: list[Example], batch_size: int, progress: str | None):
    """``examples`` in slices of ``batch_size``; with ``progress`` (the bar's label) a tqdm bar
    of rows on stderr, which tqdm leaves out when stderr is not a terminal."""
    with tqdm(
        total=len(examples), desc=progress, unit="row", file=sys.stderr, disable=None if progress else True
    ) as bar:
        for i in range(0, len(examples), batch_size):
            part = examples[i : i + batch_size]
            yield part
            bar.update(len(part))


@torch.no_grad()
def nll(
    model,
    examples: list[Example],
    pad_id: int,
    device,
    batch_size: int = 8,
    adapter: str | None = None,
    progress: str | None = None,
):
    """(summed NLL, labelled tokens) of ``examples`` (through ``adapter`` on every row)."""
    total, tokens = 0.0, 0
    for part in _batches(examples, batch_size, progress):
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        with _adapter(model, adapter, len(part)):
            total += float(token_losses(model, batch).sum())
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    return total, tokens


@torch.no_grad()
def probabilities(
    model,
    examples: list[Example],
    pad_id: int,
    sizes: list[int],
    device,
    batch_size: int = 8,
    adapter: str | None = None,
    progress: str | None = None,
) -> list[torch.Tensor]:
    """Each head's softmax over its classes: a list of (n, K_j) float32 tensors on the CPU."""
    parts: list[list[torch.Tensor]] = [[] for _ in sizes]
    for part in _batches(examples, batch_size, progress):
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        with _adapter(model, adapter, len(part)):
            logits = classify(model, batch["input_ids"], batch["attention_mask"]).float()  # (B, Σ K_j)
        for j, head in enumerate(logits.split(sizes, dim=-1)):
            parts[j].append(head.softmax(-1).cpu())
    return [torch.cat(p) for p in parts]


def classification_scores(probs: list[torch.Tensor], examples: list[Example], heads: list[dict]) -> dict:
    """The first head's metrics of ``classification_metrics`` at the top level, and every head's
    under "heads"; with several heads also the joint accuracy (every head right) and the mean
    macro-F1 over heads (what the best adapter is then chosen by)."""
    from loraflow.evaluate.metrics import classification_metrics, joint_accuracy  # scikit-learn: when used

    scores: dict = {"heads": {}}
    labels = [[e.classes[j] for e in examples] for j in range(len(heads))]
    for j, head in enumerate(heads):
        scores["heads"][head["column"]] = classification_metrics(labels[j], probs[j].numpy(), head["classes"])
    first = scores["heads"][heads[0]["column"]]
    scores.update({k: first[k] for k in SUMMARY})
    if len(heads) > 1:
        preds = [p.argmax(-1).tolist() for p in probs]
        scores["joint_accuracy"] = joint_accuracy(labels, preds)
        scores["mean_macro_f1"] = sum(h["macro_f1"] for h in scores["heads"].values()) / len(heads)
    return scores


def evaluate_dev(cfg, model, tok, data, device) -> dict[str, dict]:
    """Each tenant's dev score through its own adapter: {tenant: {"loss", "ppl"} or metrics}."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for name, examples in data.dev.items():
            if not examples:
                continue
            adapter = name if cfg.adapter else None
            if cfg.task == "causal-lm":
                from loraflow.evaluate.metrics import perplexity

                total, tokens = nll(model, examples, tok.pad_token_id, device, cfg.batch_size, adapter)
                out[name] = {"loss": total / max(1, tokens), "ppl": perplexity(total, max(1, tokens))}
            else:
                probs = probabilities(
                    model, examples, tok.pad_token_id, data.head_sizes, device, cfg.batch_size, adapter
                )
                full = classification_scores(probs, examples, data.heads)
                out[name] = {k: v for k, v in full.items() if k != "heads"}
    finally:
        model.train(was_training)
    return out


def _adapter(model, name: str | None, rows: int):
    if name is None or getattr(model, "loraflow_active", None) == name:
        return contextlib.nullcontext()
    from loraflow.adapters import use_adapters

    return use_adapters(model, [name] * rows)
