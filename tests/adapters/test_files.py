import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import loraflow as lf
from conftest import ids, make, outputs, randomize, rel_err, targets, tiny_llama


def peft_outputs(peft_model, x):
    with torch.no_grad():
        out = peft_model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_saved_files_use_the_peft_layout(tmp_path):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="a")
    lf.save_adapter(model, tmp_path / "a", name="a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json",
                                                                 "adapter_model.safetensors"]
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("kind", ["lora", "flora", "deep"])
def test_round_trip_each_kind(arch, kind, tmp_path):
    cfg = {"lora": lf.LoRAConfig(r=3, alpha=6, target_modules=targets(arch)),
           "flora": lf.FLoRAConfig(r=2, target_modules="all-linear"),
           "deep": lf.DeepLoRAConfig(r=2, depth=3, target_modules=targets(arch))}[kind]
    model = make(arch)
    lf.add_adapter(model, cfg, name="x")
    randomize(model, "x")
    x = ids()
    expected = outputs(model, x)
    lf.save_adapter(model, tmp_path / "x")
    other = make(arch)
    assert lf.load_adapter(other, tmp_path / "x") == "x"
    assert type(lf.list_adapters(other)["x"]) is type(cfg)
    torch.testing.assert_close(outputs(other, x), expected, rtol=1e-6, atol=1e-6)


def test_compressed_deep_lora_round_trip(tmp_path):
    model = make("llama")
    lf.add_adapter(model, lf.DeepLoRAConfig(r=2, target_modules=["q_proj"]), name="d")
    batch = {"input_ids": ids(), "labels": ids()}
    lf.compress(model, batch)
    randomize(model, "d")
    lf.save_adapter(model, tmp_path / "d")
    other = make("llama")
    lf.load_adapter(other, tmp_path / "d")
    assert other.model.layers[0].self_attn.q_proj.adapters["d"].width == 2
    torch.testing.assert_close(outputs(other, ids()), outputs(model, ids()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "bert"])
def test_loraflow_adapter_loads_in_peft_with_equal_outputs(arch_name, tmp_path):
    model = make(arch_name)
    cfg = lf.LoRAConfig(r=4, alpha=16, target_modules=targets(arch_name), use_rslora=True,
                        rank_pattern={targets(arch_name)[0]: 2}, alpha_pattern={targets(arch_name)[1]: 5})
    lf.add_adapter(model, cfg, name="a")
    randomize(model, "a")
    x = ids()
    ours = outputs(model, x)
    lf.save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(make(arch_name), tmp_path / "a").eval()
    assert rel_err(peft_outputs(peft_model, x), ours) < 1e-5
    assert rel_err(ours, outputs(make(arch_name), x)) > 1e-3   # the adapter does something


@pytest.mark.parametrize("arch_name, peft_targets", [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("llama", r".*\.layers\.1\..*_proj"),
    ("gpt2", ["c_attn", "c_proj"]),
    ("bert", ["query", "key", "value", "dense"]),
])
def test_peft_adapter_loads_in_loraflow_with_equal_outputs(arch_name, peft_targets, tmp_path):
    first = peft_targets[0] if isinstance(peft_targets, list) else "q_proj"
    config = LoraConfig(r=8, lora_alpha=16, target_modules=peft_targets, init_lora_weights=False,
                        rank_pattern={first: 2}, alpha_pattern={first: 3}, use_rslora=True,
                        fan_in_fan_out=arch_name == "gpt2")
    peft_model = get_peft_model(make(arch_name), config).eval()
    x = ids()
    expected = peft_outputs(peft_model, x)
    peft_model.save_pretrained(tmp_path / "p")

    model = make(arch_name)
    assert lf.load_adapter(model, tmp_path / "p", name="d") == "d"
    assert rel_err(outputs(model, x), expected) < 1e-5
    assert rel_err(expected, outputs(make(arch_name), x)) > 1e-3
    loaded = lf.list_adapters(model)["d"]
    assert loaded.use_rslora and loaded.alpha == 16


def test_pickle_is_refused_unless_opted_in(tmp_path):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    randomize(model, "a")
    lf.save_adapter(model, tmp_path / "a")
    folder = tmp_path / "a"
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="allow_pickle=True"):
        lf.load_adapter(make("llama"), folder)
    other = make("llama")
    lf.load_adapter(other, folder, allow_pickle=True)
    torch.testing.assert_close(outputs(other, ids()), outputs(model, ids()))


def test_missing_files_are_named(tmp_path):
    model = make("llama")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lf.load_adapter(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lf.load_adapter(model, tmp_path / "empty")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    lf.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lf.load_adapter(make("llama"), tmp_path / "a")


def test_shape_mismatch_names_the_layer_and_leaves_the_model_unchanged(tmp_path):
    small = tiny_llama(hidden=32)
    lf.add_adapter(small, lf.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), name="a")
    lf.save_adapter(small, tmp_path / "a")
    big = tiny_llama(hidden=48)
    lf.add_adapter(big, lf.LoRAConfig(r=2, target_modules=["k_proj"]), name="mine")
    before = {n: type(m) for n, m in big.named_modules()}
    with pytest.raises(ValueError) as err:
        lf.load_adapter(big, tmp_path / "a", name="b")
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "(4, 32)" in msg and "(4, 48)" in msg
    assert {n: type(m) for n, m in big.named_modules()} == before
    assert list(lf.list_adapters(big)) == ["mine"]


def test_foreign_layers_and_unsupported_features_are_refused(tmp_path):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    lf.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="c_attn"):   # a GPT-2 model has no q_proj
        lf.load_adapter(make("gpt2"), tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        lf.load_adapter(make("llama"), tmp_path / "a")
    cfg["use_dora"], cfg["peft_type"] = False, "IA3"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="IA3"):
        lf.load_adapter(make("llama"), tmp_path / "a")


def test_unknown_keys_are_refused(tmp_path):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    lf.save_adapter(model, tmp_path / "a")
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(2, 128)
    save_file(weights, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lora_embedding_A"):
        lf.load_adapter(make("llama"), tmp_path / "a")


def test_save_is_atomic_and_overwrites(tmp_path):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    lf.save_adapter(model, tmp_path / "a")
    randomize(model, "a")
    lf.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json",
                                                                 "adapter_model.safetensors"]
    other = make("llama")
    lf.load_adapter(other, tmp_path / "a")
    torch.testing.assert_close(outputs(other, ids()), outputs(model, ids()))


def test_failed_save_keeps_the_previous_files(tmp_path, monkeypatch):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(target_modules=["q_proj"]), name="a")
    lf.save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    randomize(model, "a")

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("loraflow.adapters.files.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lf.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json",
                                                                 "adapter_model.safetensors"]
