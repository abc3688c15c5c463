"""use_adapters: every row of a batch with its own adapter, in inference and training."""

import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model

import loraflow as lf
from conftest import DEVICE, clone, ids, make, outputs, randomize, rel_err, tiny_llama

IMPLS = ["loop", "bmm", "segmented", "triton"]


def model_with_three_peft_adapters(tmp_path):
    """A tiny Llama with three PEFT adapters of different ranks and targets, and loraflow's copy."""
    peft_model = None
    specs = {"sql": dict(r=2, target_modules=["q_proj", "v_proj"]),
             "med": dict(r=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]),
             "py": dict(r=4, target_modules="all-linear", use_rslora=True)}
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
        lf.load_adapter(model, tmp_path / name, name=name)   # PEFT: one subfolder per adapter
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
    for i, n in enumerate(names):   # and every row on its own
        lf.set_adapter(model, n)
        assert rel_err(got[i], outputs(model, x[i:i + 1])[0]) < 1e-5, (i, n)


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
        assert rel_err(got[i], outputs(model, x[i:i + 1])[0]) < 1e-5, (i, n)


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
        assert rel_err(got[i], outputs(merged, x[i:i + 1])[0]) < 1e-5


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

    threads = [threading.Thread(target=work, args=(0, ["a", "a"])),
               threading.Thread(target=work, args=(1, [None, None]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
