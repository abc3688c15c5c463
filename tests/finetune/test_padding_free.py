"""Padding-free batches: packed rows give the padded batch's logits, losses and gradients, and a
packed run trains the adapter a padded run trains; what cannot be packed is refused by name."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import masking_utils

import loraflow as lf
from loraflow.finetune.config import FinetuneConfig
from loraflow.finetune.data import Example, collate
from loraflow.finetune.loop import finetune
from loraflow.finetune.model import classify, token_losses
from loraflow.finetune.packing import pack, packed_classify, packed_token_losses
from loraflow.models import varlen_attention
from loraflow.models.varlen_attention import supports_varlen, use_varlen_attention

LENGTHS = [5, 11, 1, 8]


def _examples(vocab: int, causal: bool) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        if causal:  # a prompt of two tokens without loss, then the completion
            out.append(Example(ids, labels=[-100] * min(2, n) + ids[2:]))
        else:
            out.append(Example(ids, classes=[i % 3]))
    return out


def _model(tiny_smol: str, task: str):
    kw = {"num_labels": 3} if task == "sequence-classification" else {}
    model, _ = lf.load_model(tiny_smol, task=task, **kw)
    lf.add_adapter(model, lf.LoRAConfig(r=4, alpha=8, target_modules="all-linear"), name="a")
    for layer in (m for _, m in lf.adapter_layers(model, "a")):
        for p in layer.adapters["a"].parameters():  # non-zero B: the adapter changes the output
            torch.nn.init.normal_(p, std=0.05)
    model.config.pad_token_id = 0
    return model


def test_packed_classifier_equals_padded(tiny_smol, monkeypatch):
    model = _model(tiny_smol, "sequence-classification")
    examples = _examples(model.config.vocab_size, causal=False)
    padded = collate(examples, pad_id=0)
    want = classify(model, padded["input_ids"], padded["attention_mask"])  # (N, 3)
    use_varlen_attention(model)
    calls, rows_sdpa = [], varlen_attention._rows_sdpa
    monkeypatch.setattr(varlen_attention, "_rows_sdpa", lambda *a: calls.append(1) or rows_sdpa(*a))
    monkeypatch.setattr(masking_utils, "sdpa_mask", None)  # packed: no (T, T) mask is built
    got = packed_classify(model, pack(examples))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(calls) == model.config.num_hidden_layers  # every layer took the packed path
    monkeypatch.undo()
    # the padded path of the same (re-routed) model is still SDPA's
    torch.testing.assert_close(classify(model, padded["input_ids"], padded["attention_mask"]), want)


def test_packed_token_losses_and_gradients_equal_padded(tiny_smol):
    model = _model(tiny_smol, "causal-lm")
    examples = _examples(model.config.vocab_size, causal=True)
    params = lf.adapter_parameters(model, "a")

    def grads(loss):
        for p in params:
            p.grad = None
        loss.sum().backward()
        return [p.grad.clone() for p in params]

    want = token_losses(model, collate(examples, pad_id=0))  # (N,)
    want_grads = grads(want)
    use_varlen_attention(model)
    got = packed_token_losses(model, pack(examples))
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-4)
    assert got[2] == 0  # the one-token row predicts nothing
    for g, w in zip(grads(got), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


def test_pack_layout():
    examples = [Example([7, 8, 9], labels=[-100, 8, 9]), Example([4, 5], labels=[4, 5])]
    b = pack(examples)
    assert b["input_ids"].tolist() == [[7, 8, 9, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["cu_seq_lens"].tolist() == [0, 3, 5] and b["max_length"] == 3
    assert b["row"].tolist() == [0, 0, 0, 1, 1]
    # shifted per row: a row's last token predicts nothing, never the next row's first token
    assert b["labels"].tolist() == [[8, 9, -100, 5, -100]]


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_packed_run_trains_the_padded_runs_adapter(tmp_path, tiny_smol, chat_file, medical_csv, task):
    data = chat_file if task == "causal-lm" else medical_csv
    kw = dict(model=tiny_smol, data=data, task=task, steps=4, save_every=4, batch_size=4, max_length=64, lr=1e-2,
              dev_fraction=0.0, progress=False)  # fmt: skip
    packed = finetune(FinetuneConfig(out=str(tmp_path / "packed"), padding_free=True, **kw))
    padded = finetune(FinetuneConfig(out=str(tmp_path / "padded"), padding_free=False, **kw))
    assert packed["padding_free"] and not padded["padding_free"]
    a, b = (load_file(Path(tmp_path / n / "adapter_model.safetensors")) for n in ("packed", "padded"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained


def test_what_cannot_be_packed_is_refused(tmp_path, tiny_smol, tenant_files):
    with pytest.raises(ValueError, match="padding-free batches take one adapter"):
        FinetuneConfig(out=str(tmp_path / "o"), tenants=tenant_files, padding_free=True)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    assert not supports_varlen(gpt2)
    with pytest.raises(ValueError, match="cannot take packed batches.*padded batches"):
        use_varlen_attention(gpt2)
