"""Tiny random models built from configs (never downloaded) and helpers shared by the tests."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

# tests/faults reuses the tiny-model server helpers of tests/serve (``from helpers import ...``)
sys.path.insert(0, str(Path(__file__).resolve().parent / "serve"))

if not torch.cuda.is_available():  # before Triton is imported: kernels run in its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from loraflow.adapters import DeepLoRA, FLoRA, LoRA, adapter_layers

pytest_plugins = ["finetune_fixtures"]  # tiny_smol, chat_file, tenant_files, medical_csv

VOCAB = 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels run for real


def tiny_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


# name -> (builder, two target module names of that architecture)
MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),  # Conv1D layers
    "bert": (tiny_bert, ["query", "value"]),
}


@pytest.fixture(params=sorted(MODELS))
def arch(request):
    return request.param


def make(arch: str, seed: int = 0):
    return MODELS[arch][0](seed)


def targets(arch: str) -> list[str]:
    return MODELS[arch][1]


def ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def outputs(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize(model, name: str, seed: int = 0) -> None:
    """Move adapter ``name`` away from its (identity) init so that tests can see it."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model, name):
        a = layer.adapters[name]
        if isinstance(a, LoRA):
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.2)
        elif isinstance(a, FLoRA):
            a.A.copy_(1 + 0.3 * torch.randn(a.A.shape, generator=g))
            a.B.copy_(1 + 0.3 * torch.randn(a.B.shape, generator=g))
        elif isinstance(a, DeepLoRA):
            for p in a.factors:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def clone(model):
    return copy.deepcopy(model)
