"""The server and adapter files (issue 23): files the loader refuses are a 400 at
/v1/load_lora_adapter naming the adapter and the file (no server path), never a "Success" then
500s; a file fixed on disk loads at the next request without a restart; a classifier folder is
refused at startup and at runtime loads."""

import json
import shutil

import httpx
import pytest
import torch
from helpers import LiveServer, peft_adapter, tiny_llama_folder
from safetensors.torch import load_file, save_file

import loraflow as lf
from loraflow.serve.command import check_adapters
from loraflow.serve.registry import AdapterError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    tiny_llama_folder(root / "base")
    (root / "dir").mkdir()
    peft_adapter(root / "base", root / "good", 2, ["q_proj", "v_proj"], seed=0)
    return root


@pytest.fixture(scope="module")
def server(root):
    shutil.copytree(root / "good", root / "dir" / "fixed")
    engine = lf.Engine(
        model=root / "base", device="cpu", max_batch_tokens=256, adapters={"fixed": root / "dir" / "fixed"}
    )
    s = LiveServer(engine, adapter_dir=str(root / "dir"), allow_runtime_lora=True)
    yield s
    s.close()


def variant(root, name, config=None, weights=None):
    """A copy of the good adapter under the adapter dir, its config fields / weights changed."""
    folder = root / "dir" / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / "good", folder)
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if weights:
        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({k: weights(v) for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def load(server, name, folder):
    return httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})


def complete(server, model):
    body = {"model": model, "prompt": "w3 w4", "max_tokens": 2, "temperature": 0}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize(
    "name, change, says",
    [
        ("nan", {"config": {"lora_alpha": float("nan")}}, "adapter_config.json: lora_alpha is nan"),
        ("huge", {"config": {"lora_alpha": 1e38}}, "adapter_config.json: lora_alpha is 1e+38"),
        (
            "rank",
            {"config": {"r": 8}},
            "has rank 2 in adapter_model.safetensors but adapter_config.json gives it rank 8",
        ),
        ("x1e30", {"weights": lambda t: t * 1e30}, "beyond the |w| <= 10000"),
        ("int", {"weights": lambda t: t.to(torch.int32)}, "is int32 in adapter_model.safetensors"),
    ],
)
def test_refused_files_are_a_400_at_runtime_load_naming_adapter_and_file(server, root, name, change, says):
    folder = variant(root, name, **change)
    r = load(server, name, folder)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert says in message and message.startswith(f"adapter {name!r}: ")
    assert str(root) not in message  # no server path
    assert complete(server, name).status_code == 404  # not registered


def test_a_broken_file_fixed_on_disk_loads_without_a_restart(server, root):
    weights = root / "dir" / "fixed" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])  # broken: truncated
    r = complete(server, "fixed")
    assert r.status_code == 400 and "not a readable safetensors file" in r.json()["error"]["message"], r.text
    assert str(root) not in r.json()["error"]["message"]
    assert complete(server, "fixed").status_code == 400  # still the same broken file: still refused
    weights.write_bytes(good)  # fixed on disk
    assert complete(server, "fixed").status_code == 200


def classifier(root):
    folder = variant(root, "cls", config={"task_type": "SEQ_CLS", "modules_to_save": ["score"]})
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.score.weight"] = torch.zeros(3, 64)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def test_a_classifier_is_refused_at_a_runtime_load(server, root):
    r = load(server, "cls", classifier(root))
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "adapter 'cls' is a classifier" in message and "loraflow eval --adapter" in message
    assert str(root) not in message


def test_serve_refuses_a_classifier_at_startup(root):
    folder = classifier(root)
    with pytest.raises(SystemExit, match=r"loraflow serve: --lora cls=.*is a classifier.*loraflow eval --adapter"):
        check_adapters({"ok": str(root / "good"), "cls": str(folder)})
    check_adapters({"ok": str(root / "good")})  # a causal-LM adapter passes
    registry = lf.Engine(model=root / "base", device="cpu", max_batch_tokens=64).registry
    with pytest.raises(AdapterError, match="is a classifier"):
        registry.register("cls", folder)
    assert registry.scan(root / "dir") >= 1 and not registry.known("cls")  # scanning skips it
