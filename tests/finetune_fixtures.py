"""Fixtures for the fine-tuning and evaluation tests (a plugin of tests/conftest.py): a tiny
random Llama with the embedded model's tokenizer (real text, real chat template) and a few
rows of the data sets that examples/data holds."""

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loraflow.models.loading import default_model_path

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"  # the repository's copies of shared/data


@pytest.fixture(scope="session")
def tiny_smol(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_smol")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            messages = [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tenant_files(tmp_path_factory) -> dict[str, str]:
    """Two tenants' prompt/completion files of different lengths and styles."""
    folder = tmp_path_factory.mktemp("tenants")
    files = {}
    for name, n, fmt in (("sums", 12, "{i} + {i} = {s}"), ("words", 9, "say {i} twice: {i} {i} {i}")):
        path = folder / f"{name}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                text = fmt.format(i=i, s=2 * i)
                prompt, completion = text.split(":" if ":" in text else "=", 1)
                f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
        files[name] = str(path)
    return files


@pytest.fixture(scope="session")
def medical_csv(tmp_path_factory) -> str:
    """40 medical abstracts, 8 of each of the 5 conditions, with a second label column."""
    rows = list(csv.DictReader(open(DATA / "medical_abstracts" / "abstracts.csv", newline="")))
    picked, count = [], {}
    for r in rows:
        if count.get(r["condition_label"], 0) < 8:
            count[r["condition_label"]] = count.get(r["condition_label"], 0) + 1
            picked.append(r)
    path = tmp_path_factory.mktemp("medical") / "abstracts.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "severity"])
        for i, r in enumerate(picked):
            w.writerow([r["medical_abstract"], r["condition_label"], "high" if i % 2 else "low"])
    return str(path)
