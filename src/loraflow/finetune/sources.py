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


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of a tenant's n examples in ``epoch`` (the same for every run with the seed)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def rows_of(n: int, seed: int, micro: int, batch: int) -> list[int]:
    """The example indices of a tenant's ``micro``-th micro-batch: ``batch`` consecutive
    positions in the concatenation of its epochs' permutations."""
    out, orders = [], {}
    for pos in range(micro * batch, (micro + 1) * batch):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(int(orders[epoch][i]))
    return out
