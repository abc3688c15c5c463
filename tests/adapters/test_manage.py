import pytest
import torch
from conftest import ids, make, outputs, randomize, rel_err, targets
from torch import nn

import loraflow as lf


def test_unknown_target_lists_the_models_linear_names():
    model = make("llama")
    with pytest.raises(ValueError) as err:
        lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj", "query_proj"]), name="a")
    msg = str(err.value)
    assert "query_proj" in msg and "q_proj" in msg and "o_proj" in msg and "down_proj" in msg
    assert not lf.list_adapters(model)
    with pytest.raises(ValueError, match="match no linear layer"):
        lf.add_adapter(model, lf.LoRAConfig(target_modules=r".*nothing.*"), name="a")


def test_all_linear_skips_the_output_head(arch):
    model = make(arch)
    lf.add_adapter(model, lf.LoRAConfig(r=2, target_modules="all-linear"), name="a")
    names = [n for n, _ in lf.adapter_layers(model, "a")]
    assert names and not any(n.startswith(("lm_head", "classifier")) for n in names)
    expected = {"llama": 14, "gpt2": 8, "bert": 13}[arch]  # 7 / 4 / 6 per block; BERT: + pooler
    assert len(names) == expected


def test_regex_targets_match_full_names():
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj"), name="a")
    assert [n for n, _ in lf.adapter_layers(model, "a")] == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
    ]


def test_api_of_the_issue_on_one_model():
    model = make("llama")
    x = ids()
    base = outputs(model, x)
    lf.add_adapter(model, lf.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), name="a")
    lf.add_adapter(model, lf.FLoRAConfig(r=2, target_modules="all-linear"), name="b")
    lf.add_adapter(model, lf.DeepLoRAConfig(r=8, depth=3, target_modules=["q_proj"]), name="c")
    assert list(lf.list_adapters(model)) == ["a", "b", "c"] and lf.active_adapter(model) == "a"
    for name in "abc":
        randomize(model, name)
    got = {}
    for name in ["a", "b", "c", None]:
        lf.set_adapter(model, name)
        got[name] = outputs(model, x)
    torch.testing.assert_close(got[None], base, rtol=0, atol=0)
    for name in "abc":
        assert rel_err(got[name], base) > 1e-3, name
    lf.set_adapter(model, "b")  # switching back gives the same numbers
    torch.testing.assert_close(outputs(model, x), got["b"], rtol=0, atol=0)


def test_only_the_chosen_adapter_gets_gradients(arch):
    model = make(arch)
    lf.add_adapter(model, lf.LoRAConfig(r=2, target_modules=targets(arch)), name="a")
    lf.add_adapter(model, lf.FLoRAConfig(r=2, target_modules=targets(arch)), name="b")
    randomize(model, "a")
    params = lf.mark_trainable(model, "a")
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    lf.set_adapter(model, "a")
    model.train()
    out = model(input_ids=ids())
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    for p in lf.adapter_parameters(model, "b"):
        assert p.grad is None
    trainable = {id(p) for p in params}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)


def test_delete_restores_the_original_modules():
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj", "k_proj"]), name="b")
    lf.delete_adapter(model, "a")
    assert isinstance(model.model.layers[0].self_attn.q_proj, lf.AdapterLinear)
    assert lf.active_adapter(model) is None
    lf.delete_adapter(model, "b")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not lf.list_adapters(model)


def test_switching_while_merged_is_refused():
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="b")
    lf.merge_adapter(model, "a")
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        lf.set_adapter(model, "b")
    with pytest.raises(RuntimeError, match="merged"):
        lf.merge_adapter(model, "b")
    lf.unmerge_adapter(model, "a")
    lf.set_adapter(model, "b")


def test_names_are_checked():
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    with pytest.raises(KeyError, match="'zzz'.*'a'"):
        lf.set_adapter(model, "zzz")
    with pytest.raises(ValueError, match="without '.'"):
        lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="x.y")
