"""A user's data files to training examples for ``loraflow finetune``.

Causal language modelling reads plain text (a file or a folder, packed into chunks of exactly
``max_length`` tokens), prompt/completion records (loss on the completion only, as in TRL) or chat
records with ``messages`` (loss on the assistant turns only, found by rendering the chat template
turn by turn). Classification reads rows with a text column and one label column per head.

Labels are per-token targets aligned with ``input_ids`` (not shifted: the model shifts), ``-100``
where there is no loss. Every problem in the data is a ValueError (or FileNotFoundError) naming the
file, the line or row, the problem and the fix: these messages are read by people who wrote the
file by hand, usually long after the line that caused them scrolled away.

Reading the files is in ``records`` (``read_rows`` is re-exported here), the chat template in ``chat``.
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from loraflow.finetune.chat import assistant_targets, encode
from loraflow.finetune.records import JSON_TYPES, ROW_SUFFIXES, places, read_rows

IGNORE = -100  # the label of a token without loss (PyTorch's cross-entropy ignore_index)
FORMATS = (
    'prompt-completion records {"prompt": "...", "completion": "..."} or chat records '
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
)


@dataclass
class Example:
    """One training example: token ids and either per-token ``labels`` or one class per head."""

    input_ids: list[int]
    labels: list[int] | None = None  # causal LM: per-token targets, -100 = no loss, same length as input_ids
    classes: list[int] | None = None  # classification: one class index per head (label column)
    truncated: bool = False


@dataclass
class Stats:
    """What the loader reports for the log."""

    format: str  # "prompt-completion" | "messages" | "text" | "classification"
    rows: int  # records read (text: files read)
    examples: int
    truncated: int  # examples cut at max_length (text: 0)
    tokens: int  # total input tokens
    loss_tokens: int  # tokens with a label != -100 (classification: examples)


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"--max-length must be a positive whole number of tokens, got {max_length!r}")


def causal_lm_examples(path: str | os.PathLike, tokenizer, max_length: int) -> tuple[list[Example], Stats]:
    """Causal-LM examples from plain text (a folder or a text file) or a file of prompt/completion or chat records.

    ``.jsonl``, ``.json`` and ``.csv`` files hold records (CSV: prompt/completion columns); anything else,
    and every file under a folder, is plain text.
    """
    path = Path(path)
    _check_max_length(max_length)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: check the path")
    if path.is_dir() or path.suffix.lower() not in ROW_SUFFIXES:
        return _text_examples(path, tokenizer, max_length)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the model's tokenizer has no eos token, so {path}'s examples cannot end: set one")
    rows = read_rows(path)
    where = places(rows, str(path))
    first = _record_format(rows[0], f"{path} {where[0]}")
    if first == "messages" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{path} holds chat records ('messages') but the model has no chat template to render them: "
            "use prompt/completion records instead"
        )
    bos = _implicit_bos(tokenizer)
    examples = []
    for row, place in zip(rows, where):
        at = f"{path} {place}"
        kind = _record_format(row, at)
        if kind != first:
            raise ValueError(
                f"{at} is a {kind} record but {where[0]} is a {first} record: one file holds one format; "
                f"split the file or convert the records. Accepted: {FORMATS}"
            )
        make = _prompt_completion if kind == "prompt-completion" else _chat_example
        examples.append(make(row, tokenizer, max_length, at, bos))
    return examples, _lm_stats(first, len(rows), examples)


def _lm_stats(fmt: str, rows: int, examples: list[Example]) -> Stats:
    return Stats(
        format=fmt,
        rows=rows,
        examples=len(examples),
        truncated=sum(ex.truncated for ex in examples),
        tokens=sum(len(ex.input_ids) for ex in examples),
        loss_tokens=sum(sum(t != IGNORE for t in ex.labels) for ex in examples),
    )


def _record_format(record: dict, at: str) -> str:
    pc = "prompt" in record or "completion" in record
    if pc and "messages" in record:
        raise ValueError(f"{at} has both 'messages' and 'prompt'/'completion': keep one. Accepted: {FORMATS}")
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if pc:
        missing = "completion" if "prompt" in record else "prompt"
        raise ValueError(f"{at} has no '{missing}': prompt-completion records need both 'prompt' and 'completion'")
    keys = ", ".join(repr(k) for k in record) or "none"
    raise ValueError(f"{at} is neither a prompt-completion nor a chat record (keys found: {keys}). Accepted: {FORMATS}")


def _implicit_bos(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer's normal call starts with a BOS that add_special_tokens=False drops."""
    bos = tokenizer.bos_token_id
    plain, special = encode(tokenizer, "a"), list(tokenizer("a")["input_ids"])
    return [bos] if bos is not None and special[:1] == [bos] and plain[:1] != [bos] else []


def _finish(ids: list[int], labels: list[int], max_length: int, at: str, context: str) -> Example:
    """The example cut at ``max_length``; an error when nothing to learn from is left."""
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels):
        raise ValueError(
            f"{at}: {context} fills --max-length {max_length} on its own, leaving no token to learn from: "
            "pass a larger --max-length or shorten the record"
        )
    return Example(input_ids=ids, labels=labels, truncated=truncated)


def _prompt_completion(record: dict, tokenizer, max_length: int, at: str, bos: list[int]) -> Example:
    """TRL's convention: prompt + completion + eos, with loss on the completion and the eos only."""
    for key in ("prompt", "completion"):
        if not isinstance(record[key], str):
            kind = JSON_TYPES.get(type(record[key]), "null")
            raise ValueError(f"{at}: '{key}' is {kind}, not a string: give text (for conversations use 'messages')")
    prompt = bos + encode(tokenizer, record["prompt"])
    completion = encode(tokenizer, record["completion"])
    if completion[-1:] != [tokenizer.eos_token_id]:
        completion.append(tokenizer.eos_token_id)
    return _finish(prompt + completion, [IGNORE] * len(prompt) + completion, max_length, at, "the prompt")


def _chat_example(record: dict, tokenizer, max_length: int, at: str, bos: list[int]) -> Example:
    """The conversation through the chat template, with loss on each assistant turn and its end-of-turn token."""
    del bos  # the chat template writes its own BOS, if the model uses one
    ids, targets = assistant_targets(record["messages"], tokenizer, at)
    labels = [IGNORE] * len(ids)
    for start, end in targets:
        labels[start:end] = ids[start:end]
    return _finish(ids, labels, max_length, at, "the conversation before the first assistant turn")


def _text_examples(path: Path, tokenizer, max_length: int) -> tuple[list[Example], Stats]:
    """Files joined with eos and packed into chunks of exactly ``max_length`` tokens; labels are the ids."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
        )
    stream, read, skipped = [], 0, []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            if path.is_file():
                raise ValueError(f"{path} is not UTF-8 text: save it as UTF-8") from None
            skipped.append(file)
            continue
        ids = encode(tokenizer, text)
        read += 1
        if ids:
            if stream:
                if tokenizer.eos_token_id is None:
                    raise ValueError("the model's tokenizer has no eos token to join the text files with: set one")
                stream.append(tokenizer.eos_token_id)
            stream.extend(ids)
    if skipped:
        warnings.warn(
            f"{path}: skipped {len(skipped)} file(s) that are not UTF-8 text (first: {skipped[0]})", stacklevel=3
        )
    if not stream:
        what = "no text" if path.is_file() else "no text files (hidden and non-UTF-8 files are skipped)"
        raise ValueError(f"{path} holds {what}: give it text to train on")
    n = len(stream) // max_length
    chunks = [stream[k * max_length : (k + 1) * max_length] for k in range(n)] or [stream]
    examples = [Example(input_ids=c, labels=list(c)) for c in chunks]
    return examples, _lm_stats("text", read, examples)


def _label_order(labels: set[str]) -> list[str]:
    """Numeric order when every label is a number ("2" before "10"), else lexicographic."""
    try:
        return sorted(labels, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(labels)


def classification_examples(
    rows: list[dict],
    tokenizer,
    text_column: str,
    label_columns: list[str],
    max_length: int,
    classes: list[list[str]] | None = None,
    source: str = "data",
) -> tuple[list[Example], list[list[str]], Stats]:
    """One example per row: the text's first ``max_length`` tokens and one class index per label column.

    ``classes`` None learns each column's classes from the rows (sorted); given (evaluation), a label
    outside them is an error. Returns the examples, the classes per column and the stats.
    """
    _check_max_length(max_length)
    if not rows:
        raise ValueError(f"{source} holds no rows")
    if not label_columns:
        raise ValueError("no label column given: name the column(s) that hold the labels")
    found = list(rows[0])
    for column in (text_column, *label_columns):
        if column not in rows[0]:
            close = difflib.get_close_matches(column, [str(c) for c in found], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"column '{column}' is not in {source}; columns found: {', '.join(map(str, found))}{hint}")
    if classes is not None and len(classes) != len(label_columns):
        raise ValueError(f"{len(classes)} class lists for {len(label_columns)} label columns: give one per column")
    where = places(rows, source)
    texts, labels = [], []
    for row, place in zip(rows, where):
        text = row.get(text_column)
        if text is None or not str(text).strip():
            raise ValueError(f"{source} {place}: the text column '{text_column}' is empty: give it text or remove it")
        texts.append(str(text))
        values = [row.get(c) for c in label_columns]
        values = ["" if v is None else str(v).strip() for v in values]
        for column, value in zip(label_columns, values):
            if not value:
                raise ValueError(f"{source} {place}: the label column '{column}' is empty: label the row or remove it")
        labels.append(values)
    if classes is None:
        classes = [_label_order({row[h] for row in labels}) for h in range(len(label_columns))]
        for column, names in zip(label_columns, classes):
            if len(names) < 2:
                raise ValueError(
                    f"column '{column}' of {source} holds only the label '{names[0]}': "
                    "classification needs at least 2 classes"
                )
    index = [{str(name): k for k, name in enumerate(names)} for names in classes]
    examples, truncated = [], 0
    encoded = tokenizer(texts)["input_ids"]
    for ids, values, place in zip(encoded, labels, where):
        picked = []
        for column, value, known, names in zip(label_columns, values, index, classes):
            if value not in known:
                shown = ", ".join(map(str, names[:20])) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
                raise ValueError(
                    f"{source} {place}: the label '{value}' in column '{column}' is not one of the model's classes "
                    f"({shown}): remove the row or train a model that knows the label"
                )
            picked.append(known[value])
        cut = len(ids) > max_length
        truncated += cut
        examples.append(Example(input_ids=list(ids[:max_length]), classes=picked, truncated=cut))
    n = len(examples)
    stats = Stats("classification", len(rows), n, truncated, sum(len(ex.input_ids) for ex in examples), n)
    return examples, [list(map(str, names)) for names in classes], stats


def split_dev(
    examples: list[Example], fraction: float, seed: int, stratify: bool, class_names: list[str] | None = None
) -> tuple[list[Example], list[Example]]:
    """``(train, dev)``: scikit-learn's train_test_split, deterministic for a seed, each part in file order.

    ``stratify`` keeps the first head's class proportions in both parts (classification examples only;
    causal-LM examples have no classes and are split at random). ``class_names`` names the first head's
    classes in the error messages.
    """
    from sklearn.model_selection import train_test_split

    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ValueError(f"--dev-fraction must lie strictly between 0 and 1 (such as 0.1), got {fraction!r}")
    n = len(examples)
    fix = "add examples, pass a dev file with --dev, or --dev-fraction 0"
    if n < 2:
        raise ValueError(f"{n} example(s) cannot be split into train and dev: {fix}")
    y = None
    if stratify and examples[0].classes is not None:
        y = [ex.classes[0] for ex in examples]
        counts = Counter(y)
        name = lambda c: class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
        rare = sorted(c for c, k in counts.items() if k < 2)
        if rare:
            raise ValueError(
                f"class '{name(rare[0])}' has {counts[rare[0]]} example: a stratified dev split needs at least 2 "
                f"per class; {fix}"
            )
        n_dev = math.ceil(fraction * n)  # scikit-learn's own count
        if n_dev < len(counts) or n - n_dev < len(counts):
            raise ValueError(
                f"a dev fraction of {fraction} gives {n_dev} dev and {n - n_dev} train examples, but a stratified "
                f"split needs each of the {len(counts)} classes in both: use a --dev-fraction between "
                f"{len(counts) / n:.3g} and {1 - len(counts) / n:.3g}, or {fix}"
            )
    try:
        train, dev = train_test_split(list(range(n)), test_size=fraction, random_state=seed, stratify=y)
    except ValueError as e:
        raise ValueError(f"cannot split {n} examples with a dev fraction of {fraction} ({e}): {fix}") from None
    return [examples[i] for i in sorted(train)], [examples[i] for i in sorted(dev)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch, right-padded to the longest example: input_ids, attention_mask, and labels or classes.

    Padded label positions hold -100 (no loss) whatever ``pad_id`` is, so a pad token that equals eos
    does not hide the eos targets.
    """
    if not examples:
        raise AssertionError("collate needs at least one example")
    causal = examples[0].labels is not None
    if any((ex.labels is not None) != causal or (ex.classes is not None) == causal for ex in examples):
        raise AssertionError("collate got a mix of causal-LM and classification examples (or neither)")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        input_ids[i, : len(ex.input_ids)] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[i, : len(ex.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if causal:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, ex in enumerate(examples):
            labels[i, : len(ex.labels)] = torch.tensor(ex.labels, dtype=torch.long)
        batch["labels"] = labels
    else:
        batch["classes"] = torch.tensor([ex.classes for ex in examples], dtype=torch.long)
    return batch
