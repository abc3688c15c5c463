import pytest
import torch
import torch.nn.functional as F
from conftest import ids, make, outputs, randomize, rel_err, targets

import loraflow as lf


def test_new_adapter_equals_base_model(arch):
    model = make(arch)
    x = ids()
    base = outputs(model, x)
    lf.add_adapter(model, lf.LoRAConfig(r=4, alpha=8, target_modules="all-linear"), name="a")
    assert lf.active_adapter(model) == "a"
    torch.testing.assert_close(outputs(model, x), base, rtol=0, atol=0)


def test_merged_equals_unmerged_and_unmerge_restores_w0(arch):
    model = make(arch)
    x = ids()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lf.add_adapter(model, lf.LoRAConfig(r=4, alpha=8, target_modules=targets(arch)), name="a")
    randomize(model, "a")
    unmerged = outputs(model, x)
    assert rel_err(unmerged, outputs(lf.set_adapter(model, None) or model, x)) > 1e-3  # it matters
    lf.set_adapter(model, "a")
    lf.merge_adapter(model, "a")
    assert rel_err(outputs(model, x), unmerged) < 1e-5
    lf.unmerge_adapter(model, "a")
    assert rel_err(outputs(model, x), unmerged) < 1e-5
    for n, p in model.named_parameters():
        key = n.replace(".base.", ".")
        if key in w0:
            assert rel_err(p, w0[key]) < 1e-6, n


def test_forward_is_w0x_plus_scaled_bax():
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(r=4, alpha=12, target_modules=["q_proj"]), name="a")
    randomize(model, "a")
    layer = model.model.layers[0].self_attn.q_proj
    a = layer.adapters["a"]
    x = torch.randn(3, 5, layer.d_in)
    expected = F.linear(x, layer.base.weight + (12 / 4) * a.B @ a.A)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_rslora_and_patterns_set_rank_and_scale():
    model = make("llama")
    cfg = lf.LoRAConfig(
        r=8,
        alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 4},
    )
    lf.add_adapter(model, cfg, name="a")
    q0 = model.model.layers[0].self_attn.q_proj.adapters["a"]
    v0 = model.model.layers[0].self_attn.v_proj.adapters["a"]
    v1 = model.model.layers[1].self_attn.v_proj.adapters["a"]
    assert (q0.r, v0.r, v1.r) == (2, 8, 8)
    assert q0.scale == pytest.approx(16 / 2**0.5)
    assert v0.scale == pytest.approx(16 / 8**0.5)
    assert v1.scale == pytest.approx(4 / 8**0.5)


def test_dropout_only_in_training():
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj"]), name="a")
    randomize(model, "a")
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, layer.d_in)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), layer(x))


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("r", {"r": 0}),
        ("r", {"r": 2.5}),
        ("alpha", {"alpha": 0}),
        ("alpha", {"alpha": -1}),
        ("dropout", {"dropout": 1.0}),
        ("target_modules", {"target_modules": []}),
        ("rank_pattern", {"rank_pattern": {"q_proj": 0}}),
    ],
)
def test_bad_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        lf.LoRAConfig(**kwargs)
