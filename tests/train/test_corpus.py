"""The pre-training corpus: files, held-out split, batched tokenization, tokenizer sample."""

from pathlib import Path

import torch
from transformers import AutoTokenizer

import loraflow as lf
from loraflow.train.corpus import read_corpus, spread, text_files, tokenize_files, tokenizer_sample

DATA = Path(__file__).parents[2] / "examples" / "data" / "tinyshakespeare" / "input.txt"


def _corpus(folder: Path, n: int, chars: int) -> Path:
    """``n`` files of tinyshakespeare, ``chars`` characters each."""
    text = DATA.read_text()
    folder.mkdir()
    for i in range(n):
        (folder / f"part{i:02d}.txt").write_text(text[i * chars : (i + 1) * chars])
    return folder


def test_batched_tokenization_equals_one_call_per_file(tmp_path):
    files = text_files(_corpus(tmp_path / "c", 12, 3000))
    tok = AutoTokenizer.from_pretrained(lf.models.default_model_path(), local_files_only=True)
    per_file = [tok(f.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for f in files]
    batched = tokenize_files(files, tok, files_per_call=5)  # calls of 5, 5 and 2 files
    assert batched.tolist() == [t for ids in per_file for t in ids]
    assert (batched == tok.eos_token_id).sum() == 12 and len(batched) > 12 * 500
    train, held_out = read_corpus(tmp_path / "c", tok)  # the last file (5% of 12, rounded up)
    assert held_out.tolist() == per_file[-1] and len(train) == len(batched) - len(per_file[-1])
    assert tokenizer_sample(files, 0.0075) == files[:2] and tokenizer_sample(files, 1e-6) == files[:1]
    assert spread(torch.arange(10).view(10, 1), 4).flatten().tolist() == [0, 3, 6, 9]
