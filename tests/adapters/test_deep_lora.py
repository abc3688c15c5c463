import pytest
import torch
from conftest import ids, make, outputs, randomize, rel_err, targets

import loraflow as lf


def lm_batch(seed=1):
    x = ids(batch=4, seq=9, seed=seed)
    return {"input_ids": x, "labels": x}


def test_wide_init_is_orthogonal_times_epsilon_and_equals_base(arch):
    model = make(arch)
    x = ids()
    base = outputs(model, x)
    cfg = lf.DeepLoRAConfig(r=4, depth=3, epsilon=1e-3, target_modules=targets(arch))
    lf.add_adapter(model, cfg, name="d")
    assert rel_err(outputs(model, x), base) < 1e-6
    for _, layer in lf.adapter_layers(model, "d"):
        a = layer.adapters["d"]
        assert a.width == min(layer.d_in, layer.d_out) and len(a.factors) == 3
        for w in a.factors:  # rows or columns orthonormal, times epsilon
            g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(g, 1e-6 * torch.eye(g.shape[0]), rtol=0, atol=1e-10)


def test_merged_equals_unmerged(arch):
    model = make(arch)
    x = ids()
    lf.add_adapter(model, lf.DeepLoRAConfig(r=2, target_modules=targets(arch)), name="d")
    randomize(model, "d")
    unmerged = outputs(model, x)
    lf.merge_adapter(model, "d")
    assert rel_err(outputs(model, x), unmerged) < 1e-5
    lf.unmerge_adapter(model, "d")
    assert rel_err(outputs(model, x), unmerged) < 1e-5


def dense_gradients(model, batch, names):
    """∂loss/∂ΔW for each layer, through a dense probe added to the base weight."""
    grads = {}
    for n in names:
        layer = model.get_submodule(n)
        layer.base.weight.requires_grad_(True)
    model(**batch).loss.backward()
    for n in names:
        grads[n] = model.get_submodule(n).base.weight.grad.clone()
        model.get_submodule(n).base.weight.grad = None
        model.get_submodule(n).base.weight.requires_grad_(False)
    return grads


def test_compress_keeps_the_map_and_spans_the_gradient_subspace():
    model = make("llama")
    cfg = lf.DeepLoRAConfig(r=3, depth=3, target_modules=["q_proj", "down_proj"])
    lf.add_adapter(model, cfg, name="d")
    lf.mark_trainable(model, "d")
    batch = lm_batch()
    before = outputs(model, batch["input_ids"])
    names = [n for n, _ in lf.adapter_layers(model, "d")]
    expected = dense_gradients(model, batch, names)

    singular = lf.compress(model, batch, name="d")

    assert rel_err(outputs(model, batch["input_ids"]), before) < 1e-6
    for n in names:
        a = model.get_submodule(n).adapters["d"]
        assert [tuple(w.shape) for w in a.factors] == [(3, a.factors[0].shape[1]), (3, 3), (a.factors[-1].shape[0], 3)]
        assert all(w.requires_grad for w in a.factors)
        u, s, vh = torch.linalg.svd(expected[n])
        torch.testing.assert_close(singular[n], s[:3], rtol=1e-4, atol=1e-7)
        delta = a.delta_weight() / 1e-9  # -eps^3 · U_r V_rᵀ: along -G, downhill
        torch.testing.assert_close(delta, -(u[:, :3] @ vh[:3]), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="compressed already"):
        lf.compress(model, batch, name="d")


def test_compress_under_bf16_autocast_takes_the_gradient_in_float32(monkeypatch):
    # as fine-tuning on CUDA runs it: bf16 autocast around the forward and backward (a bf16
    # gradient reached torch.linalg.svd, which has no bf16 kernel on CUDA)
    model = make("llama")
    lf.add_adapter(model, lf.DeepLoRAConfig(r=3, depth=3, target_modules=["q_proj"]), name="d")
    seen, svd = [], torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **kw: seen.append(a.dtype) or svd(a, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        singular = lf.compress(model, lm_batch(), name="d")
    assert seen == [torch.float32] * len(singular) and len(singular) == 2


def test_compressed_adapter_trains_with_discrepant_learning_rates():
    model = make("llama")
    lf.add_adapter(model, lf.DeepLoRAConfig(r=4, gamma=0.1, target_modules="all-linear"), name="d")
    lf.mark_trainable(model, "d")
    batch = lm_batch()
    lf.compress(model, batch, name="d")
    groups = lf.deep_lora_param_groups(model, "d", lr=3e-2)
    assert [g["lr"] for g in groups] == pytest.approx([3e-3, 3e-2])
    assert sum(len(g["params"]) for g in groups) == len(lf.adapter_parameters(model, "d"))
    opt = torch.optim.Adam(groups)
    model.train()
    losses = []
    for _ in range(60):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("depth", {"depth": 1}),
        ("r", {"r": 0}),
        ("epsilon", {"epsilon": 0}),
        ("gamma", {"gamma": -1}),
    ],
)
def test_bad_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        lf.DeepLoRAConfig(**kwargs)
