"""use_adapters: every row of a batch with its own adapter, in inference and training."""

import threading

import pytest
import torch
from conftest import DEVICE, clone, ids, make, outputs, randomize, rel_err, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn

import loraflow as lf
from loraflow.adapters import adapter_layers
from loraflow.multi.rows import _cached, _Stamp

IMPLS = ["loop", "bmm", "segmented", "triton"]


def model_with_three_peft_adapters(tmp_path):
    """A tiny Llama with three PEFT adapters of different ranks and targets, and loraflow's copy."""
    peft_model = None
    specs = {
        "sql": dict(r=2, target_modules=["q_proj", "v_proj"]),
        "med": dict(r=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]),
        "py": dict(r=4, target_modules="all-linear", use_rslora=True),
    }
    for i, (name, spec) in enumerate(specs.items()):
        cfg = LoraConfig(lora_alpha=16, init_lora_weights=False, **spec)
        torch.manual_seed(10 + i)
        if peft_model is None:
            peft_model = get_peft_model(tiny_llama(), cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    peft_model.save_pretrained(tmp_path)
    model = tiny_llama()
    for name in specs:
        lf.load_adapter(model, tmp_path / name, name=name)  # PEFT: one subfolder per adapter
    return peft_model.eval(), model


def test_loop_equals_peft_mixed_batch_forward(tmp_path):
    peft_model, model = model_with_three_peft_adapters(tmp_path)
    x = ids(batch=6, seq=5)
    names = ["sql", "med", None, "py", "sql", None]
    with torch.no_grad():
        expected = peft_model(input_ids=x, adapter_names=[n or "__base__" for n in names]).logits
    with lf.use_adapters(model, names, impl="loop"):
        got = outputs(model, x)
    assert rel_err(got, expected) < 1e-5
    for i, n in enumerate(names):  # and every row on its own
        lf.set_adapter(model, n)
        assert rel_err(got[i], outputs(model, x[i : i + 1])[0]) < 1e-5, (i, n)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_impl_equals_loop_on_a_mixed_model(impl):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), name="a")
    lf.add_adapter(model, lf.LoRAConfig(r=6, alpha=3, target_modules="all-linear"), name="b")
    lf.add_adapter(model, lf.FLoRAConfig(r=3, target_modules=["q_proj", "up_proj"]), name="f")
    lf.add_adapter(model, lf.DeepLoRAConfig(r=2, target_modules=["k_proj"]), name="d")
    for n in "abfd":
        randomize(model, n)
    model, x = model.to(DEVICE), ids(batch=7, seq=4).to(DEVICE)
    names = ["f", "a", None, "b", "d", "f", "a"]
    with lf.use_adapters(model, names, impl="loop"):
        ref = outputs(model, x)
    with lf.use_adapters(model, names, impl=impl):
        got = outputs(model, x)
    assert rel_err(got, ref) < 1e-5
    for i, n in enumerate(names):
        lf.set_adapter(model, n)
        assert rel_err(got[i], outputs(model, x[i : i + 1])[0]) < 1e-5, (i, n)


def test_flora_rows_equal_the_merged_weight():
    model = make("llama")
    lf.add_adapter(model, lf.FLoRAConfig(r=2, target_modules="all-linear"), name="f1")
    lf.add_adapter(model, lf.FLoRAConfig(r=5, target_modules="all-linear"), name="f2")
    randomize(model, "f1", seed=1), randomize(model, "f2", seed=2)
    x = ids(batch=3, seq=6)
    with lf.use_adapters(model, ["f2", None, "f1"]):
        got = outputs(model, x)
    for i, n in enumerate(["f2", None, "f1"]):
        merged = clone(model)
        if n:
            lf.merge_adapter(merged, n)
        else:
            lf.set_adapter(merged, None)
        assert rel_err(got[i], outputs(merged, x[i : i + 1])[0]) < 1e-5


@pytest.mark.parametrize("impl", ["loop", "bmm", "segmented"])
def test_each_adapter_gets_the_gradient_of_its_own_rows(impl):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(r=4, target_modules="all-linear"), name="a")
    lf.add_adapter(model, lf.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), name="b")
    lf.add_adapter(model, lf.FLoRAConfig(r=2, target_modules=["o_proj"]), name="f")
    for n in "abf":
        randomize(model, n)
    for p in model.parameters():
        p.requires_grad_(False)
    params = {n: lf.adapter_parameters(model, n) for n in "abf"}
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)
    x = ids(batch=6, seq=5)
    names = ["a", "b", "f", None, "b", "a"]

    def grads(rows, row_names):
        model.zero_grad(set_to_none=True)
        with lf.use_adapters(model, row_names, impl=impl):
            model(input_ids=x[rows], labels=x[rows]).logits.float().pow(2).sum().backward()
        return {n: [None if p.grad is None else p.grad.clone() for p in ps] for n, ps in params.items()}

    mixed = grads(list(range(6)), names)
    for n in "abf":
        rows = [i for i, m in enumerate(names) if m == n]
        alone = grads(rows, [n] * len(rows))[n]
        for g_mixed, g_alone in zip(mixed[n], alone):
            assert g_mixed is not None and g_mixed.abs().sum() > 0
            assert rel_err(g_mixed, g_alone) < 1e-5, n


def test_bad_names_and_lengths_are_explained():
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    with pytest.raises(KeyError, match=r"'zz'.*\['a'\]"):
        with lf.use_adapters(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="3 adapter names but the batch has 2 rows"):
        with lf.use_adapters(model, ["a", None, "a"]):
            outputs(model, ids(batch=2))
    with pytest.raises(ValueError, match="impl must be one of"):
        with lf.use_adapters(model, ["a"], impl="fast"):
            pass
    lf.merge_adapter(model, "a")
    with pytest.raises(RuntimeError, match="merged"):
        with lf.use_adapters(model, ["a"]):
            pass


def test_outside_the_with_the_active_adapter_applies_again():
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    randomize(model, "a")
    x = ids()
    before = outputs(model, x)
    with lf.use_adapters(model, [None, None]):
        assert rel_err(outputs(model, x), outputs(make("llama"), x)) < 1e-6
    torch.testing.assert_close(outputs(model, x), before, rtol=0, atol=0)


def test_two_threads_with_two_models_do_not_interfere():
    models = [make("llama"), make("llama")]
    for m in models:
        lf.add_adapter(m, lf.LoRAConfig(target_modules="all-linear"), name="a")
        randomize(m, "a")
    x = ids(batch=2)
    expected = [None, None]
    with lf.use_adapters(models[0], ["a", "a"]):
        expected[0] = outputs(models[0], x)
    with lf.use_adapters(models[1], [None, None]):
        expected[1] = outputs(models[1], x)
    errors = []
    barrier = threading.Barrier(2)

    def work(i, names):
        barrier.wait()
        for _ in range(20):
            with lf.use_adapters(models[i], names):
                if rel_err(outputs(models[i], x), expected[i]) > 1e-6:
                    errors.append(i)

    threads = [
        threading.Thread(target=work, args=(0, ["a", "a"])),
        threading.Thread(target=work, args=(1, [None, None])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# --- the packed-weights cache follows the parameters, never id() of a temporary (issue #14) ---


def test_stamp_changes_with_what_the_weights_are():
    p = nn.Parameter(torch.randn(4, 3))
    st = _Stamp(p)
    assert st.still(p) and st.still(p)  # same untouched parameter
    with torch.no_grad():
        p.add_(1)  # in place: optimizer-like step
    assert not st.still(p)
    st = _Stamp(p)
    p.detach().copy_(torch.randn(4, 3))  # a detach() shares the version counter
    assert not st.still(p)
    st, version = _Stamp(p), p._version
    p.data = torch.randn(4, 3)  # new storage, version not bumped
    assert p._version == version and not st.still(p)
    st = _Stamp(p)
    assert not st.still(nn.Parameter(p.detach().clone()))  # equal values, another tensor/storage
    assert not st.still(p.detach())  # same storage, another tensor
    assert st.still(p)


def test_stamp_of_a_dead_tensor_matches_nothing_even_at_its_id():
    """Deep LoRA's B is a new product every call: a stamp of one must match no later product,
    whether or not Python hands the later one the same id (the test does not need that to happen:
    a dead tensor's stamp has no referent, and its storage is held so no pointer can repeat)."""
    w = [torch.randn(3, 3) for _ in range(2)]
    b = w[0] @ w[1]
    st, old = _Stamp(b), (id(b), b.data_ptr())
    del b
    assert st.ref() is None
    later = [w[0] @ w[1] for _ in range(20)]  # equal values; ids may repeat old[0]
    assert all(torch.equal(c, later[0]) for c in later)
    assert not any(st.still(c) for c in later)
    assert old[1] not in {c.data_ptr() for c in later}


def test_cached_recomputes_only_when_a_source_changes():
    layer, calls = nn.Module(), []
    a, b = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(3, 2))

    def get(meta=("x", 1.0), sources=None):
        return _cached(layer, "_c", meta, [a, b] if sources is None else sources, lambda: calls.append(1) or len(calls))

    assert get() == 1 and get() == 1  # untouched: computed once
    with torch.no_grad():
        b.mul_(2)
    assert get() == 2 and get() == 2
    assert get(meta=("x", 2.0)) == 3  # a scale changed
    assert get(meta=("x", 2.0), sources=[a, nn.Parameter(b.detach().clone())]) == 4
    assert get(meta=("x", 2.0), sources=[a]) == 5


def _deep_and_lora_model():
    model = make("llama")
    lf.add_adapter(model, lf.DeepLoRAConfig(r=2, depth=3, target_modules=["q_proj"]), name="d")
    lf.add_adapter(model, lf.LoRAConfig(r=2, alpha=4, target_modules=["q_proj"]), name="a")
    randomize(model, "d", seed=1), randomize(model, "a", seed=2)
    return model.to(DEVICE)


@pytest.mark.parametrize("name", ["d", "a"])
def test_triton_follows_in_place_changes_between_forwards(name):
    """Write Deep LoRA's middle factor W_2 (or LoRA's B) in place between triton forwards, with
    nothing else in between; every forward must equal the loop's on the same weights. Keyed on
    id() of the product W_3 W_2, this failed 9 in 30 (on CUDA; rarer under the interpreter)."""
    model, x = _deep_and_lora_model(), ids(batch=3, seq=3).to(DEVICE)
    names = ["a", "d", None] if name == "d" else ["a", None, "a"]
    layer = adapter_layers(model, name)[0][1]
    param = layer.adapters[name].factors[1] if name == "d" else layer.adapters[name].B
    g = torch.Generator().manual_seed(0)
    writes = 20 if DEVICE == "cuda" else 8  # each forward under Triton's interpreter takes 0.15 s
    weights = [torch.randn(param.shape, generator=g).to(DEVICE) / param.shape[1] ** 0.5 for _ in range(writes)]
    refs = []
    for w in weights:
        with torch.no_grad():
            param.copy_(w)
        with lf.use_adapters(model, names, impl="loop"):
            refs.append(outputs(model, x))
    with lf.use_adapters(model, names, impl="triton"):
        outputs(model, x)
        entry = layer._packed
        outputs(model, x)
        assert layer._packed is entry  # untouched weights: packed once
        for i, (w, ref) in enumerate(zip(weights, refs)):
            with torch.no_grad():
                param.copy_(w)
            assert rel_err(outputs(model, x), ref) < 1e-5, i
            assert layer._packed is not entry  # the write repacked
            entry = layer._packed
