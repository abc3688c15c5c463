"""The pre-training corpus: text or code files under a folder, a held-out split, token ids
(through an optional safetensors cache) and fixed-length sequences. Used by ``loraflow
pretrain`` (``train/pretrain.py``).

Files (.txt, .md, .py, ...) are tokenized 256 per call, so that a fast tokenizer encodes
them in parallel, and joined with the end-of-sequence token; the last 5% of the files (or of
the tokens, for one file) are held out. ``train_tokenizer`` learns a byte-level BPE on a
sample of them when no tokenizer is given.
"""

from __future__ import annotations

import hashlib
import json
import math
from itertools import chain
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraflow.atomic import atomic_write

SPECIAL = ["<|endoftext|>"]
TEXT = (".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs")
EVAL_FRACTION = 0.05


def train_tokenizer(files: list[Path], vocab_size: int, out: Path):
    """A byte-level BPE tokenizer trained on ``files`` (no download), saved under ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], pad_token=SPECIAL[0])
    fast.save_pretrained(out)
    return fast


def tokenizer_sample(files: list[Path], max_mb: float) -> list[Path]:
    """The first of ``files``, whole and in order, up to ``max_mb`` MB (10^6 bytes) in all;
    at least one file."""
    if max_mb <= 0:
        raise ValueError(f"--tokenizer-sample-mb must be > 0, got {max_mb}")
    chosen, total = [], 0
    for f in files:
        size = f.stat().st_size
        if chosen and total + size > max_mb * 1e6:
            break
        chosen.append(f)
        total += size
    return chosen


def text_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise FileNotFoundError(f"--data {folder} does not exist")
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.suffix in TEXT and p.is_file())
    if not files:
        raise FileNotFoundError(f"no text files ({', '.join(TEXT)}) under {folder}")
    return files


def split_files(files: list[Path], eval_fraction: float = EVAL_FRACTION) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): the last ``eval_fraction`` of the files, at least one;
    a single file is split by tokens instead (``read_corpus``), so it is all training here."""
    if len(files) == 1:
        return files, []
    n_eval = max(1, math.ceil(len(files) * eval_fraction))
    return files[:-n_eval], files[-n_eval:]


def tokenize_files(paths: list[Path], tokenizer, files_per_call: int = 256) -> torch.Tensor:
    """The tokens of ``paths`` in order, each file followed by the end-of-sequence token.
    The tokenizer gets ``files_per_call`` texts per call: a fast tokenizer encodes them in
    parallel; the ids are those of one call per file."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: give one that has (files are joined with it)")
    parts = [torch.zeros(0, dtype=torch.long)]
    for i in range(0, len(paths), files_per_call):
        texts = [p.read_text(errors="ignore") for p in paths[i : i + files_per_call]]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        parts.append(torch.tensor(list(chain.from_iterable(x + [eos] for x in ids)), dtype=torch.long))
    return torch.cat(parts)


def read_corpus(folder: Path, tokenizer, eval_fraction: float = EVAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(training ids, held-out ids) of the text files under ``folder``."""
    return corpus_ids(text_files(folder), tokenizer, eval_fraction)


def corpus_ids(files: list[Path], tokenizer, eval_fraction: float = EVAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    train_files, eval_files = split_files(files, eval_fraction)
    if not eval_files:
        ids = tokenize_files(files, tokenizer)
        cut = int(len(ids) * (1 - eval_fraction))
        return ids[:cut], ids[cut:]
    return tokenize_files(train_files, tokenizer), tokenize_files(eval_files, tokenizer)


def _vocab_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha1(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def cached_corpus(folder: Path, tokenizer, cache: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``read_corpus``, through the .safetensors file ``cache`` when given: loaded when it
    exists (after checking it was made with this tokenizer from as many files), else
    written (a temporary file, then renamed: concurrent runs never see half a file)."""
    files = text_files(folder)
    meta = {"vocab_size": str(len(tokenizer)), "vocab_sha1": _vocab_digest(tokenizer), "files": str(len(files))}
    if cache is not None and cache.is_file():
        with safe_open(cache, framework="pt") as f:
            saved = f.metadata() or {}
        redo = "delete it to tokenize again"
        if saved.get("vocab_size") != meta["vocab_size"]:
            raise ValueError(
                f"--tokens-cache {cache} was made with a tokenizer of {saved.get('vocab_size')} tokens, "
                f"this one has {meta['vocab_size']}: give the tokenizer it was made with "
                f"(--tokenizer FOLDER), or {redo}"
            )
        if saved.get("vocab_sha1") != meta["vocab_sha1"]:
            raise ValueError(
                f"--tokens-cache {cache} was made with another tokenizer of the same size: give the "
                f"tokenizer it was made with (--tokenizer FOLDER), or {redo}"
            )
        if saved.get("files") != meta["files"]:
            raise ValueError(
                f"--tokens-cache {cache} was made from {saved.get('files')} files, --data {folder} "
                f"has {meta['files']}: give the same --data, or {redo}"
            )
        ids = load_file(cache)
        return ids["train"].long(), ids["eval"].long()
    train, held_out = corpus_ids(files, tokenizer)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: save_file({"train": train.int(), "eval": held_out.int()}, tmp, metadata=meta))
    return train, held_out


def pack(ids: torch.Tensor, seq: int) -> torch.Tensor:
    n = len(ids) // seq
    if n == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one sequence of {seq}: give more data or a smaller --seq")
    return ids[: n * seq].view(n, seq)


def spread(seqs: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` sequences evenly spaced over ``seqs`` (all of them when there are no more than
    ``k``): the evaluation covers every part of the held-out files, not only the first ones."""
    if len(seqs) <= k:
        return seqs
    return seqs[torch.linspace(0, len(seqs) - 1, k).round().long()]
