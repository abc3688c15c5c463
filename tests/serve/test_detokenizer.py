"""Incremental detokenization: token by token, alone or many requests in one call, the text
equals the whole output decoded at once, and what a stream shows is always a prefix of it."""

import pytest
from transformers import AutoTokenizer

from loraflow.models.loading import default_model_path
from loraflow.serve.detokenizer import Detokenizer
from loraflow.serve.request import Request
from loraflow.serve.sampling import SamplingParams

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Café naïve — 東京タワー 🗼🙂 ok",  # multi-byte characters split across byte-level tokens
    "  two  spaces\tand a tab",
    "ends inside an emoji 🧑‍🔬",
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


def stream(det, tok, texts, batched: bool):
    """Feed each text's ids one token a step; returns (final texts, every shown text)."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    reqs = [Request(f"r{i}", [1], SamplingParams(max_tokens=500)) for i in range(len(texts))]
    shown = [[] for _ in texts]
    for step in range(max(map(len, ids))):
        live = [(i, r) for i, r in enumerate(reqs) if step < len(ids[i])]
        for i, r in live:
            r.output_ids.append(ids[i][step])
        if batched:
            det.append_texts([r for _, r in live])
        else:
            for _, r in live:
                det.append_text(r)
        for i, r in live:
            shown[i].append(det.stream_text(r))
    return [r.text for r in reqs], shown, ids


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
def test_streamed_text_equals_the_whole_decode(tok, batched):
    det = Detokenizer(tok, set())
    texts, shown, ids = stream(det, tok, TEXTS, batched)
    for text, seen, i in zip(texts, shown, ids):
        whole = tok.decode(i, skip_special_tokens=True)
        assert text == whole
        assert all(whole.startswith(s) for s in seen)
        assert all("\ufffd" not in s for s in seen)
        assert [len(s) for s in seen] == sorted(len(s) for s in seen)  # it only grows


def test_batched_equals_one_by_one(tok):
    one = stream(Detokenizer(tok, set()), tok, TEXTS, False)[1]
    many = stream(Detokenizer(tok, set()), tok, TEXTS, True)[1]
    assert one == many
