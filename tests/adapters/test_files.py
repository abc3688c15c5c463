import json

import pytest
import torch
from conftest import ids, make, outputs, randomize, rel_err, targets, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import loraflow as lf
from loraflow.adapters.files import read_adapter


def peft_outputs(peft_model, x):
    with torch.no_grad():
        out = peft_model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_saved_files_use_the_peft_layout(tmp_path):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="a")
    lf.save_adapter(model, tmp_path / "a", name="a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("kind", ["lora", "flora", "deep"])
def test_round_trip_each_kind(arch, kind, tmp_path):
    cfg = {
        "lora": lf.LoRAConfig(r=3, alpha=6, target_modules=targets(arch)),
        "flora": lf.FLoRAConfig(r=2, target_modules="all-linear"),
        "deep": lf.DeepLoRAConfig(r=2, depth=3, target_modules=targets(arch)),
    }[kind]
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
    cfg = lf.LoRAConfig(
        r=4,
        alpha=16,
        target_modules=targets(arch_name),
        use_rslora=True,
        rank_pattern={targets(arch_name)[0]: 2},
        alpha_pattern={targets(arch_name)[1]: 5},
    )
    lf.add_adapter(model, cfg, name="a")
    randomize(model, "a")
    x = ids()
    ours = outputs(model, x)
    lf.save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(make(arch_name), tmp_path / "a").eval()
    assert rel_err(peft_outputs(peft_model, x), ours) < 1e-5
    assert rel_err(ours, outputs(make(arch_name), x)) > 1e-3  # the adapter does something


@pytest.mark.parametrize(
    "arch_name, peft_targets",
    [
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("llama", r".*\.layers\.1\..*_proj"),
        ("gpt2", ["c_attn", "c_proj"]),
        ("bert", ["query", "key", "value", "dense"]),
    ],
)
def test_peft_adapter_loads_in_loraflow_with_equal_outputs(arch_name, peft_targets, tmp_path):
    first = peft_targets[0] if isinstance(peft_targets, list) else "q_proj"
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=peft_targets,
        init_lora_weights=False,
        rank_pattern={first: 2},
        alpha_pattern={first: 3},
        use_rslora=True,
        fan_in_fan_out=arch_name == "gpt2",
    )
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
    with pytest.raises(ValueError, match="c_attn"):  # a GPT-2 model has no q_proj
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
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
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
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def _saved(tmp_path, name="a"):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), name=name)
    randomize(model, name)
    lf.save_adapter(model, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("value, label", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights_are_refused_naming_the_layer(tmp_path, value, label):
    folder = _saved(tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][3, 1] = value
    save_file(weights, folder / "adapter_model.safetensors")
    model = make("llama")
    with pytest.raises(
        ValueError,
        match=rf"adapter {folder}: layer model.layers.1.self_attn.v_proj has "
        rf"non-finite values in lora_B.weight \({label}\); retrain or fix",
    ):
        lf.load_adapter(model, folder)
    assert lf.list_adapters(model) == {}


def test_truncated_or_corrupt_files_are_named(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file.*truncated"):
        lf.load_adapter(make("llama"), folder)
    weights.unlink()
    (folder / "adapter_model.bin").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="adapter_model.bin could not be read"):
        lf.load_adapter(make("llama"), folder, allow_pickle=True)


def test_a_layer_with_lora_a_but_no_lora_b_is_named(tmp_path):
    folder = _saved(tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    del weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"layer model.layers.0.self_attn.q_proj has \['lora_A.weight'\] "
        r"but no lora_B.weight",
    ):
        read_adapter(folder)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            lambda cfg: json.dumps({k: v for k, v in cfg.items() if k != "r"}),
            "adapter_config.json: the LORA config has no 'r' field",
        ),
        (lambda cfg: json.dumps(cfg)[:-20], "adapter_config.json is not valid JSON"),
        (lambda cfg: json.dumps([cfg]), "adapter_config.json: the config must be a JSON object, got list"),
        (lambda cfg: json.dumps({**cfg, "r": "8"}), "adapter_config.json: r must be"),
        (lambda cfg: json.dumps({**cfg, "peft_type": "DEEP_LORA"}), "no 'depth' field"),
    ],
)
def test_broken_configs_are_named(tmp_path, text, message):
    folder = _saved(tmp_path)
    cfg_path = folder / "adapter_config.json"
    cfg_path.write_text(text(json.loads(cfg_path.read_text())))
    with pytest.raises(ValueError, match=message):
        lf.load_adapter(make("llama"), folder)


def test_files_symlinked_out_of_the_folder_are_refused(tmp_path):
    folder = _saved(tmp_path)
    secret = tmp_path / "elsewhere.safetensors"
    (folder / "adapter_model.safetensors").rename(secret)
    (folder / "adapter_model.safetensors").symlink_to(secret)
    with pytest.raises(ValueError, match="is a symlink to .*elsewhere.safetensors, outside the adapter folder"):
        lf.load_adapter(make("llama"), folder)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "real.safetensors").write_bytes(secret.read_bytes())  # a link inside the folder is fine
    (folder / "adapter_model.safetensors").symlink_to("real.safetensors")
    (folder / "adapter_config.json").rename(tmp_path / "config.json")
    (folder / "adapter_config.json").symlink_to(tmp_path / "config.json")
    with pytest.raises(ValueError, match="adapter_config.json is a symlink"):
        lf.load_adapter(make("llama"), folder)
    (folder / "adapter_config.json").unlink()
    (tmp_path / "config.json").rename(folder / "adapter_config.json")
    (tmp_path / "linked").symlink_to(folder)  # and so is a symlinked folder
    assert lf.load_adapter(make("llama"), tmp_path / "linked") == "linked"
