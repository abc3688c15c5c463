"""Data files to training examples: label masks, packing, CSV/JSONL parsing, dev splits and the error messages."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from loraflow.finetune.data import (
    IGNORE,
    Example,
    causal_lm_examples,
    classification_examples,
    collate,
    read_rows,
    split_dev,
)

MEDICAL = (
    Path(__file__).resolve().parents[2] / "examples" / "data" / "medical_abstracts" / "abstracts.csv"
)  # shared/data's copy


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from loraflow.models.loading import default_model_path

    try:
        folder = default_model_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def write_jsonl(path: Path, records: list, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) if not isinstance(r, str) else r for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def target_runs(tok, ex: Example) -> list[str]:
    """The decoded text of each contiguous run of tokens that carry loss."""
    runs, current = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            assert label == token  # targets are the ids themselves: the model shifts
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tok.decode(r) for r in runs + ([current] if current else [])]


def test_prompt_completion_masks_exactly_the_prompt_and_ends_with_eos(tok, tmp_path):
    prompt, completion = "Q: what is 2+2?\nA:", " 4, of course."
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}] * 2)
    examples, stats = causal_lm_examples(path, tok, max_length=512)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    n_completion = len(tok(completion, add_special_tokens=False)["input_ids"])
    ex = examples[0]
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert len(ex.input_ids) == n_prompt + n_completion + 1
    assert ex.input_ids[-1] == ex.labels[-1] == tok.eos_token_id
    assert target_runs(tok, ex) == [completion + tok.eos_token]
    assert (stats.format, stats.rows, stats.examples, stats.truncated) == ("prompt-completion", 2, 2, 0)
    assert (stats.tokens, stats.loss_tokens) == (2 * len(ex.input_ids), 2 * (n_completion + 1))


class CharTokenizer:
    """Characters as ids, with a BOS (id 1) that the normal call adds, like Llama's tokenizer."""

    bos_token_id, eos_token_id, chat_template = 1, 2, None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_a_bos_tokenizer_gets_its_bos_once_in_front_of_the_prompt(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "ab", "completion": "c"}])
    (ex,), _ = causal_lm_examples(path, CharTokenizer(), max_length=16)
    assert ex.input_ids == [1, 97, 98, 99, 2]
    assert ex.labels == [IGNORE, IGNORE, IGNORE, 99, 2]


def test_messages_train_on_the_assistant_turns_and_their_end_of_turn_only(tok, tmp_path):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (ex,), stats = causal_lm_examples(path, tok, max_length=512)
    assert target_runs(tok, ex) == ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]
    assert tok.eos_token == "<|im_end|>"  # the end-of-turn token is the eos the generation stops on
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    before_first = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    start = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    assert tok.decode(ex.input_ids[:start]) == before_first  # the generation prompt is context, not target
    assert (stats.format, stats.examples, stats.loss_tokens) == ("messages", 1, sum(t != IGNORE for t in ex.labels))


def test_a_reply_merging_with_the_generation_prompt_falls_back_to_character_offsets(tok, tmp_path):
    # "assistant\n" + "\n\ndef f()" tokenizes the newlines together: the prefix tokens are no prefix of the whole
    messages = [{"role": "user", "content": "code please"}, {"role": "assistant", "content": "\n\ndef f():\n    pass"}]
    before = tok(tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))["input_ids"]
    whole = tok(tok.apply_chat_template(messages, tokenize=False))["input_ids"]
    assert whole[: len(before)] != before  # so the token counts of the prefixes cannot be used
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (ex,), _ = causal_lm_examples(path, tok, max_length=512)
    (run,) = target_runs(tok, ex)
    assert run.endswith("\n\ndef f():\n    pass<|im_end|>") and run.strip("\n") == "def f():\n    pass<|im_end|>"
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)


def test_chat_record_errors_name_the_line(tok, tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    no_reply = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, no_reply], blank_after=1)  # the record sits on line 3
    with pytest.raises(ValueError, match=r"chat.jsonl line 3 has no assistant turn: nothing to learn from it"):
        causal_lm_examples(path, tok, 512)
    bad_role = {"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match=r"line 2: message 1 has the role 'bot'; roles are system, user, assistant"):
        causal_lm_examples(write_jsonl(tmp_path / "r.jsonl", [good, bad_role]), tok, 512)
    no_text = {"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match=r"line 1: the content of message 1 \(user\) is an array, not a string"):
        causal_lm_examples(write_jsonl(tmp_path / "c.jsonl", [no_text]), tok, 512)
    forgetful = copy.deepcopy(tok)  # drops earlier replies, as templates that strip reasoning do
    forgetful.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {% if loop.last or m['role'] != 'assistant' %}{{ m['content'] }}"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    two = {"messages": good["messages"] * 2}
    with pytest.raises(ValueError, match=r"line 1: the model's chat template does not render this conversation turn"):
        causal_lm_examples(write_jsonl(tmp_path / "f.jsonl", [two]), forgetful, 512)
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ValueError, match="has no chat template.*use prompt/completion records instead"):
        causal_lm_examples(write_jsonl(tmp_path / "t.jsonl", [good]), plain, 512)


def test_mixed_and_unknown_record_formats_are_refused_with_the_keys_found(tok, tmp_path):
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "p", "completion": "c"}, chat])
    with pytest.raises(ValueError, match=r"line 2 is a messages record but line 1 is a prompt-completion record"):
        causal_lm_examples(mixed, tok, 512)
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "t", "label": 1}])
    with pytest.raises(
        ValueError, match=r"line 1 is neither .* \(keys found: 'text', 'label'\)\. Accepted: prompt-comp"
    ):
        causal_lm_examples(other, tok, 512)
    half = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match=r"line 1 has no 'completion'"):
        causal_lm_examples(half, tok, 512)


def test_truncation_is_counted_and_a_prompt_filling_max_length_is_refused(tok, tmp_path):
    long_completion = " one two three four five six seven eight nine ten"
    records = [{"prompt": "Count:", "completion": long_completion}, {"prompt": "Hi", "completion": " yo"}]
    examples, stats = causal_lm_examples(write_jsonl(tmp_path / "pc.jsonl", records), tok, max_length=6)
    assert [ex.truncated for ex in examples] == [True, False]
    assert stats.truncated == 1 and len(examples[0].input_ids) == 6 and examples[0].labels[-1] != tok.eos_token_id
    long_prompt = [{"prompt": "a b c d e f g h", "completion": " z"}]
    with pytest.raises(ValueError, match=r"line 1: the prompt fills --max-length 4 .* pass a larger --max-length"):
        causal_lm_examples(write_jsonl(tmp_path / "long.jsonl", long_prompt), tok, max_length=4)


def test_text_folder_packs_into_chunks_of_exactly_max_length(tok, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    a = "The quick brown fox jumps over the lazy dog. " * 20
    b = "def add(x, y):\n    return x + y\n" * 15
    (folder / "a.txt").write_text(a, encoding="utf-8")
    (folder / "sub" / "b.py").write_text(b, encoding="utf-8")
    (folder / ".hidden.txt").write_text("secret " * 50, encoding="utf-8")
    (folder / "blob.bin").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) that are not UTF-8 text"):
        examples, stats = causal_lm_examples(folder, tok, max_length=32)
    stream = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream += tok(b, add_special_tokens=False)["input_ids"]
    n = len(stream) // 32
    assert len(examples) == n and n >= 5 and all(len(ex.input_ids) == 32 for ex in examples)
    assert [t for ex in examples for t in ex.input_ids] == stream[: n * 32]
    assert all(ex.labels == ex.input_ids for ex in examples)
    assert (stats.format, stats.rows, stats.examples, stats.truncated) == ("text", 2, n, 0)
    assert stats.tokens == stats.loss_tokens == n * 32
    (short,), _ = causal_lm_examples(folder / "a.txt", tok, max_length=10_000)  # the only chunk is kept as is
    assert short.input_ids == tok(a, add_special_tokens=False)["input_ids"]


def test_empty_inputs_are_refused(tok, tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty.txt holds no text"):
        causal_lm_examples(tmp_path / "empty.txt", tok, 64)
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty.jsonl holds no rows"):
        causal_lm_examples(tmp_path / "empty.jsonl", tok, 64)
    (tmp_path / "header.csv").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"header.csv holds no rows"):
        read_rows(tmp_path / "header.csv")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"nothing holds no text files"):
        causal_lm_examples(tmp_path / "nothing", tok, 64)
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl does not exist"):
        causal_lm_examples(tmp_path / "missing.jsonl", tok, 64)


def test_read_rows_names_the_bad_jsonl_line_and_the_accepted_extensions(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, '{"text": "b",}', {"text": "c"}], blank_after=1)
    with pytest.raises(ValueError, match=r"d.jsonl line 3 is not valid JSON .* one complete JSON object per line"):
        read_rows(path)
    with pytest.raises(ValueError, match=r"d.jsonl line 2 is an array, not a JSON object"):
        read_rows(write_jsonl(path, [{"text": "a"}, [1, 2]]))
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"extension '.xlsx'; accepted: .csv, .jsonl, .json"):
        read_rows(tmp_path / "d.xlsx")
    with pytest.raises(FileNotFoundError, match="nope.csv does not exist"):
        read_rows(tmp_path / "nope.csv")
    (tmp_path / "ragged.csv").write_text("text,label\nhello, world,pos\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 2 has 3 fields but the header has 2: put fields that contain commas"):
        read_rows(tmp_path / "ragged.csv")


def test_csv_with_quoted_commas_and_newlines(tok, tmp_path):
    path = tmp_path / "d.csv"
    text = '\ufefftext,label\n"Hello, world",pos\n"two\nlines, here",neg\n"say ""hi""",\n'
    path.write_text(text, encoding="utf-8")
    rows = read_rows(path)
    assert [r["text"] for r in rows] == ["Hello, world", "two\nlines, here", 'say "hi"']
    assert list(rows[0]) == ["text", "label"]  # the BOM is not part of the first column's name
    with pytest.raises(ValueError, match=r"d.csv row 4: the label column 'label' is empty"):
        classification_examples(rows, tok, "text", ["label"], 64, source=str(path))
    examples, classes, stats = classification_examples(rows[:2], tok, "text", ["label"], 64, source=str(path))
    assert classes == [["neg", "pos"]] and [ex.classes for ex in examples] == [[1], [0]]
    assert examples[1].input_ids == tok("two\nlines, here")["input_ids"]
    assert (stats.format, stats.rows, stats.examples, stats.loss_tokens) == ("classification", 2, 2, 2)


def test_classification_errors_name_the_column_row_and_label(tok, tmp_path):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "meh", "label": "neutral"}]
    with pytest.raises(ValueError, match=r"column 'lable' is not in d.csv; columns found: text, label; did you mean"):
        classification_examples(rows, tok, "text", ["lable"], 64, source="d.csv")
    with pytest.raises(ValueError, match=r"d.csv row 4: the label 'neutral' in column 'label' is not one of the m"):
        classification_examples(rows, tok, "text", ["label"], 64, classes=[["neg", "pos"]], source="d.csv")
    with pytest.raises(ValueError, match=r"\(neg, pos\): remove the row"):
        classification_examples(rows, tok, "text", ["label"], 64, classes=[["neg", "pos"]], source="d.csv")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "  ", "label": 2}], blank_after=1)
    with pytest.raises(ValueError, match=r"d.jsonl line 3: the text column 'text' is empty"):
        classification_examples(read_rows(path), tok, "text", ["label"], 64, source=str(path))


def test_two_label_columns_give_two_class_lists_and_labels_as_strings(tok, tmp_path):
    # JSONL integers and CSV strings agree; numbers sort numerically ("2" before "10")
    records = [
        {"text": "a", "topic": 10, "mood": "sad"},
        {"text": "b", "topic": 2, "mood": "happy"},
        {"text": "c", "topic": 10, "mood": "happy"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    examples, classes, _ = classification_examples(read_rows(path), tok, "text", ["topic", "mood"], 64)
    assert classes == [["2", "10"], ["happy", "sad"]]
    assert [ex.classes for ex in examples] == [[1, 1], [0, 0], [1, 0]]
    (tmp_path / "d.csv").write_text("text,topic,mood\nd,2,sad\ne,10,happy\n", encoding="utf-8")
    evaluated, same, _ = classification_examples(
        read_rows(tmp_path / "d.csv"), tok, "text", ["topic", "mood"], 64, classes
    )
    assert same == classes and [ex.classes for ex in evaluated] == [[0, 1], [1, 0]]


def test_classification_keeps_the_first_max_length_tokens_and_counts_truncation(tok):
    rows = [{"t": "one two three four five six seven eight", "y": "a"}, {"t": "short", "y": "b"}]
    examples, _, stats = classification_examples(rows, tok, "t", ["y"], max_length=4)
    assert examples[0].input_ids == tok(rows[0]["t"])["input_ids"][:4] and examples[0].truncated
    assert not examples[1].truncated and stats.truncated == 1
    assert stats.tokens == 4 + len(tok("short")["input_ids"])


def test_a_real_csv_file_loads(tok):
    rows = read_rows(MEDICAL)
    assert len(rows) > 1000 and list(rows[0]) == ["condition_label", "medical_abstract"]
    examples, classes, stats = classification_examples(
        rows[:40], tok, "medical_abstract", ["condition_label"], 128, source=str(MEDICAL)
    )
    assert classes[0] == sorted({r["condition_label"] for r in rows[:40]}, key=int)
    assert stats.examples == 40 and stats.truncated >= 30 and all(len(ex.input_ids) <= 128 for ex in examples)


def classified(labels: list[int]) -> list[Example]:
    return [Example(input_ids=[5] * (1 + i % 3), classes=[c]) for i, c in enumerate(labels)]


def test_split_dev_is_stratified_and_deterministic():
    examples = classified([0] * 30 + [1] * 20 + [2] * 10)
    train, dev = split_dev(examples, 0.2, seed=3, stratify=True)
    assert len(dev) == 12 and len(train) == 48
    for part in (train, dev):
        counts = Counter(ex.classes[0] for ex in part)
        for c, share in ((0, 0.5), (1, 1 / 3), (2, 1 / 6)):
            assert abs(counts[c] - share * len(part)) <= 1
    again = split_dev(examples, 0.2, seed=3, stratify=True)
    assert [id(ex) for ex in again[1]] == [id(ex) for ex in dev]
    other = split_dev(examples, 0.2, seed=4, stratify=True)
    assert [id(ex) for ex in other[1]] != [id(ex) for ex in dev]
    assert {id(ex) for ex in train} | {id(ex) for ex in dev} == {id(ex) for ex in examples}


def test_split_dev_refusals_name_the_class_and_the_fix():
    with pytest.raises(ValueError, match=r"class 'rare' has 1 example: a stratified dev split needs at least 2 per"):
        split_dev(classified([0, 0, 0, 1, 1, 1, 2]), 0.3, 0, True, class_names=["a", "b", "rare"])
    with pytest.raises(ValueError, match=r"gives 1 dev and 5 train .* each of the 3 classes .* between 0.5 and 0.5"):
        split_dev(classified([0, 0, 1, 1, 2, 2]), 0.1, 0, True)
    with pytest.raises(ValueError, match=r"--dev-fraction must lie strictly between 0 and 1"):
        split_dev(classified([0, 1]), 1.0, 0, False)
    lm = [Example(input_ids=[1, 2], labels=[1, 2]) for _ in range(10)]
    train, dev = split_dev(lm, 0.3, 0, stratify=True)  # no classes: a plain random split
    assert (len(train), len(dev)) == (7, 3)


def test_collate_pads_right_with_the_pad_id_and_minus_100():
    lm = [Example(input_ids=[7, 8, 9], labels=[-100, 8, 9]), Example(input_ids=[4], labels=[4])]
    batch = collate(lm, pad_id=2)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[7, 8, 9], [4, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 8, 9], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    cls = [Example(input_ids=[1, 2], classes=[0, 3]), Example(input_ids=[1, 2, 3, 4], classes=[1, 2])]
    batch = collate(cls, pad_id=0)
    assert batch["input_ids"].shape == (2, 4) and batch["classes"].tolist() == [[0, 3], [1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and "labels" not in batch
    with pytest.raises(AssertionError):
        collate(lm + cls, pad_id=0)
