"""The loader checks that an adapter's config and tensors agree and hold sane values (issue 23:
rank vs r / rank_pattern, floating dtypes, a finite positive lora_alpha in range, finite and
bounded weights), each refusal naming the file, the field, the value and the fix; files are
written readable (0644); inspect describes a classifier folder."""

import json

import pytest
import torch
from conftest import make, randomize
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForSequenceClassification

import loraflow as lf
from loraflow.adapters.files import MAX_WEIGHT, AdapterFileError
from loraflow.cli import main

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def saved(tmp_path, **config):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(**{"r": 2, "target_modules": ["q_proj", "v_proj"], **config}), name="a")
    randomize(model, "a")
    return lf.save_adapter(model, tmp_path / "a")


def edit_config(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def edit_weights(folder, change):
    weights = load_file(folder / "adapter_model.safetensors")
    change(weights)
    save_file(weights, folder / "adapter_model.safetensors")


def refused(folder) -> AdapterFileError:
    model = make("llama")
    with pytest.raises(AdapterFileError) as e:
        lf.load_adapter(model, folder)
    assert lf.list_adapters(model) == {}  # the model is left as it was
    assert str(folder) not in e.value.brief("a")  # what a server tells its clients: no path
    return e.value


def test_a_config_r_that_is_not_the_tensors_rank_is_refused(tmp_path):
    folder = saved(tmp_path)
    edit_config(folder, r=8)
    e = refused(folder)
    assert "layer model.layers.0.self_attn.q_proj has rank 2 in adapter_model.safetensors" in str(e)
    assert "adapter_config.json gives it rank 8 (r = 8)" in str(e) and "save the adapter again" in str(e)


def test_a_rank_pattern_is_what_the_tensors_must_match(tmp_path):
    folder = saved(tmp_path, rank_pattern={"v_proj": 4})
    lf.load_adapter(make("llama"), folder)  # r=2 on q_proj, 4 on v_proj: agrees
    edit_config(folder, rank_pattern={"v_proj": 3})
    assert "gives it rank 3 (its rank_pattern)" in str(refused(folder))


def test_integer_weights_are_refused(tmp_path):
    folder = saved(tmp_path)
    edit_weights(folder, lambda w: w.update({f"{Q}.lora_A.weight": w[f"{Q}.lora_A.weight"].to(torch.int32)}))
    e = refused(folder)
    assert "layer model.layers.0.self_attn.q_proj: lora_A.weight is int32 in adapter_model.safetensors" in str(e)
    assert "floating point" in str(e)


@pytest.mark.parametrize("alpha", [float("nan"), 1e38, float("inf"), 0, -4, "16", True])
def test_a_lora_alpha_that_is_not_a_sane_number_is_refused(tmp_path, alpha):
    folder = saved(tmp_path)
    edit_config(folder, lora_alpha=alpha)
    e = refused(folder)
    assert f"adapter_config.json: lora_alpha is {alpha!r}; it must be a finite number in (0, 100000]" in str(e)
    assert e.brief("a").startswith("adapter 'a': adapter_config.json: lora_alpha is")


def test_an_alpha_pattern_value_is_checked_too(tmp_path):
    folder = saved(tmp_path)
    edit_config(folder, alpha_pattern={"v_proj": float("nan")})
    assert "alpha_pattern['v_proj'] is nan" in str(refused(folder))


@pytest.mark.parametrize("factor", [1e30, 1e6])
def test_weights_beyond_the_magnitude_bound_are_refused(tmp_path, factor):
    folder = saved(tmp_path)
    edit_weights(folder, lambda w: w.update({k: v * factor for k, v in w.items()}))
    e = refused(folder)
    assert "has values up to" in str(e) and f"|w| <= {MAX_WEIGHT:g}" in str(e) and "adapter_model.safetensors" in str(e)


def test_sane_values_still_load(tmp_path):
    folder = saved(tmp_path, alpha=64.0)
    edit_weights(folder, lambda w: w.update({k: v * 100 for k, v in w.items()}))  # entries up to ~50
    lf.load_adapter(make("llama"), folder)


def test_saved_files_are_readable_by_others_under_umask_022(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        folder = saved(tmp_path)
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o755
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644, name


def classifier_folder(tmp_path):
    """A classifier folder as loraflow finetune --task classification writes it."""
    from loraflow.finetune.model import save_adapter_to

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=3, pad_token_id=0)  # fmt: skip
    model = LlamaForSequenceClassification(config)
    lf.add_adapter(model, lf.LoRAConfig(r=2, target_modules=["q_proj"]), name="default")
    heads = [{"column": "label", "classes": ["a", "b", "c"]}]
    save_adapter_to(model, "default", tmp_path / "cls", heads)
    return tmp_path / "cls"


def test_inspect_describes_a_classifier_with_its_head(tmp_path, capsys):
    main(["inspect", str(classifier_folder(tmp_path))])
    out = capsys.readouterr().out
    assert "LoRAConfig(r=2" in out and "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (2, 16)" in out
    assert "trained modules saved with the adapter (modules_to_save): score" in out
    assert "base_model.model.score.weight  (3, 16)" in out and "head 'label': 3 classes ['a', 'b', 'c']" in out
    assert "loraflow eval --adapter" in out
