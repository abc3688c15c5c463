import pytest
import torch
import torch.nn.functional as F
from conftest import ids, make, outputs, randomize, rel_err, targets

import loraflow as lf


def test_new_adapter_equals_base_model(arch):
    model = make(arch)
    x = ids()
    base = outputs(model, x)
    lf.add_adapter(model, lf.FLoRAConfig(r=3, target_modules=targets(arch)), name="f")
    assert rel_err(outputs(model, x), base) < 1e-6


def test_init_multiplier_is_all_ones_but_rank_terms_differ():
    model = make("llama")
    lf.add_adapter(model, lf.FLoRAConfig(r=4, target_modules=["q_proj"]), name="f")
    a = model.model.layers[0].self_attn.q_proj.adapters["f"]
    torch.testing.assert_close(a.multiplier(), torch.ones_like(a.multiplier()), rtol=0, atol=1e-6)
    assert (a.A[0] - a.A[1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_forward_equals_dense_product_with_merged_weight(arch_name):
    model = make(arch_name)
    lf.add_adapter(model, lf.FLoRAConfig(r=3, target_modules=targets(arch_name)), name="f")
    randomize(model, "f")
    for _, layer in lf.adapter_layers(model, "f"):
        a = layer.adapters["f"]
        w0 = layer.base.weight.T if arch_name == "gpt2" else layer.base.weight  # (d_out, d_in)
        x = torch.randn(2, 5, layer.d_in)
        expected = F.linear(x, w0 * (a.B @ a.A) / a.r, layer.base.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_merged_equals_unmerged_and_unmerge_restores_w0(arch):
    model = make(arch)
    x = ids()
    lf.add_adapter(model, lf.FLoRAConfig(r=2, target_modules=targets(arch)), name="f")
    randomize(model, "f")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = outputs(model, x)
    lf.merge_adapter(model, "f")
    assert rel_err(outputs(model, x), unmerged) < 1e-5
    lf.unmerge_adapter(model, "f")
    for n, p in model.named_parameters():
        assert rel_err(p, w0[n]) < 1e-5, n


def test_merge_refused_when_multiplier_has_zeros():
    model = make("llama")
    lf.add_adapter(model, lf.FLoRAConfig(r=1, target_modules=["q_proj"]), name="f")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapters["f"].B[0] = 0.0
    w = model.model.layers[0].self_attn.q_proj.base.weight.detach().clone()
    with pytest.raises(ValueError, match="could not be undone"):
        lf.merge_adapter(model, "f")
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base.weight, w)


@pytest.mark.parametrize("field, kwargs", [("r", {"r": 0}), ("init_noise", {"init_noise": -1.0})])
def test_bad_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        lf.FLoRAConfig(**kwargs)


def test_failed_merge_leaves_every_layer_unmerged():
    model = make("llama")
    x = ids()
    lf.add_adapter(model, lf.FLoRAConfig(r=1, target_modules=["q_proj"]), name="f")
    randomize(model, "f")
    with torch.no_grad():  # the last layer's multiplier cannot be divided out again
        model.model.layers[1].self_attn.q_proj.adapters["f"].B[0] = 0.0
    with pytest.raises(ValueError):
        lf.merge_adapter(model, "f")
    assert all(layer.merged is None for _, layer in lf.adapter_layers(model))
    lf.set_adapter(model, None)  # base weights are W0 again
    assert rel_err(outputs(model, x), outputs(make("llama"), x)) < 1e-6


@pytest.mark.parametrize("r,seq", [(1, 2), (1, 64), (8, 64)])
def test_training_path_keeps_no_r_fold_activations_and_gives_autograds_gradients(r, seq):
    """The training paths (FLoRAProducts: r products with W0, at rank 1 on a few tokens;
    otherwise FLoRAWeight: one GEMM with W0 ∘ M) equal plain autograd's gradients in float64
    (gradcheck), in float32, and under bfloat16 autocast up to bfloat16's rounding, while
    saving only the layer's input."""
    from loraflow.adapters.flora import FLoRA, FLoRAProducts, FLoRAWeight, flora_products

    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(6, 7, dtype=torch.float64)
    for fn in (FLoRAProducts, FLoRAWeight):
        assert torch.autograd.gradcheck(lambda *t: fn.apply(*t, w0), (x, a, b))

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.randn(4, seq, 96, dtype=dtype, requires_grad=True)
        layer = torch.nn.Linear(96, 128, bias=False, dtype=dtype).requires_grad_(False)
        adapter = FLoRA(96, 128, r=r, init_noise=0.1)
        with torch.no_grad():
            adapter.B.add_(0.1 * torch.randn_like(adapter.B))
        grads, saved = [], []
        for fn in (lambda: flora_products(x, adapter.A, adapter.B, layer.weight), lambda: adapter(x, layer)):
            nbytes = []

            def pack(t):
                if not isinstance(t, torch.nn.Parameter):
                    nbytes.append(t.numel() * t.element_size())
                return t

            for t in (x, adapter.A, adapter.B):
                t.grad = None
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
            with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = fn()
            (y.float() ** 2).mean().backward()
            grads.append([x.grad.float(), adapter.A.grad.clone(), adapter.B.grad.clone()])
            saved.append(sum(nbytes))
        for plain, ours in zip(*grads):
            assert rel_err(ours, plain) < tol
        # plain autograd keeps z (tokens x r x d_out) and more; ours keeps x (and A, B: parameters)
        assert saved[1] <= x.numel() * x.element_size() * 1.01 < saved[0] / min(r, 8), saved
