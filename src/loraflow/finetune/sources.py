"""A run's data: for each tenant (one adapter each; a plain run has one, "default"), its
training and dev examples, and for classification the label heads. Also the order in which
the loop takes them: seeded per tenant and epoch, so a tenant sees the same rows in the same
order whether it trains alone or beside others."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraflow.finetune.config import FinetuneConfig
from loraflow.finetune.data import Example, Stats, causal_lm_examples, classification_examples, read_rows, split_dev


@dataclass
class RunData:
    train: dict[str, list[Example]]  # tenant -> examples
    dev: dict[str, list[Example]]
    heads: list[dict] | None = None  # classification: [{"column": name, "classes": [...]}]
    stats: dict[str, dict] = field(default_factory=dict)  # tenant -> the loader's counts

    @property
    def head_sizes(self) -> list[int]:
        return [len(h["classes"]) for h in self.heads or []]


def _examples(cfg: FinetuneConfig, path: str, tok, classes=None) -> tuple[list[Example], list[list[str]] | None, Stats]:
    if cfg.task == "causal-lm":
        examples, stats = causal_lm_examples(path, tok, cfg.max_length)
        return examples, None, stats
    rows = read_rows(path)
    return classification_examples(
        rows, tok, cfg.text_column, cfg.label_columns, cfg.max_length, classes=classes, source=str(path)
    )


def load_run_data(cfg: FinetuneConfig, tok) -> RunData:
    """Read and tokenize every tenant's data and make the dev splits (stratified for
    classification); every problem is a ValueError naming the file."""
    sources = cfg.tenants or {"default": cfg.data}
    train, dev, stats, classes = {}, {}, {}, None
    for name, path in sources.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"training data {path} does not exist")
        examples, classes, st = _examples(cfg, path, tok)
        stats[name] = vars(st)
        if cfg.dev:
            train[name] = examples
            dev[name], _, dev_stats = _examples(cfg, cfg.dev, tok, classes)
            stats[name]["dev"] = vars(dev_stats)
        elif cfg.dev_fraction > 0:
            names = classes[0] if classes else None
            train[name], dev[name] = split_dev(
                examples, cfg.dev_fraction, cfg.seed, stratify=cfg.task == "classification", class_names=names
            )
        else:
            train[name], dev[name] = examples, []
        if not train[name]:
            raise ValueError(f"{path}: no training examples left after the dev split; add data or lower --dev-fraction")
    heads = [{"column": c, "classes": k} for c, k in zip(cfg.label_columns, classes)] if classes else None
    return RunData(train, dev, heads, stats)


class Order:
    """The order in which a tenant's ``n`` examples are taken, ``batch`` at a time: each epoch a
    seeded permutation, the same for every run with the seed. With ``lengths`` (group by
    length), each epoch's permutation is cut into pools of 64 batches, a pool sorted by length
    so that a batch holds examples of about one length (little padding), and the batches of the
    epoch shuffled again: every example still comes once an epoch."""

    POOL = 64  # batches sorted together

    def __init__(self, n: int, seed: int, batch: int, lengths: list[int] | None = None):
        self.n, self.seed, self.batch, self.lengths = n, seed, batch, lengths
        self._epochs: dict[int, list[int]] = {}

    def epoch(self, e: int) -> list[int]:
        if e not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 100_003 + e)
            perm = torch.randperm(self.n, generator=g).tolist()
            if self.lengths is not None:
                pool = self.batch * self.POOL
                perm = [i for k in range(0, self.n, pool) for i in sorted(perm[k : k + pool], key=self._length)]
                batches = [perm[k : k + self.batch] for k in range(0, self.n, self.batch)]
                perm = [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}  # keep two epochs
            self._epochs[e] = perm
        return self._epochs[e]

    def _length(self, i: int) -> int:
        return -self.lengths[i]

    def rows(self, micro: int) -> list[int]:
        """The example indices of the ``micro``-th micro-batch: ``batch`` consecutive positions
        in the concatenation of the epochs' orders."""
        return [self.epoch(pos // self.n)[pos % self.n] for pos in range(micro * self.batch, (micro + 1) * self.batch)]


def rows_of(n: int, seed: int, micro: int, batch: int) -> list[int]:
    """The ``micro``-th micro-batch of ``Order(n, seed, batch)`` (random batches)."""
    return Order(n, seed, batch).rows(micro)
