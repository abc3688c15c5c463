"""Adapter folders in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module name>.<suffix>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. LoRA folders are
PEFT's own format (``peft_type: "LORA"``) and load in ``peft.PeftModel.from_pretrained``;
FLoRA (``"FLORA"``, suffixes ``flora_A/B.weight``) and Deep LoRA (``"DEEP_LORA"``,
``deep_lora.<i>.weight``) use the same layout with loraflow-only fields.

Both files are written atomically (temporary file, fsync, rename), weights are read from
safetensors only: a pickled ``adapter_model.bin`` is refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loraflow.adapters.deep_lora import DeepLoRAConfig
from loraflow.adapters.flora import FLoRAConfig
from loraflow.adapters.layer import AdapterLinear, adapter_layers
from loraflow.adapters.lora import LoRAConfig
from loraflow.adapters.manage import active_adapter, attach, build_adapter, list_adapters
from loraflow.adapters.targets import find_targets, is_conv1d, linear_module_names
from loraflow.atomic import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
SUFFIXES = {
    "LORA": r"lora_[AB]\.weight",
    "FLORA": r"flora_[AB]\.weight",
    "DEEP_LORA": r"deep_lora\.\d+\.weight",
}
# PEFT LoRA features that change the math; loading one of them would silently differ.
UNSUPPORTED_LORA = {"use_dora": False, "modules_to_save": None, "layers_to_transform": None,
                    "lora_bias": False, "use_qalora": False}


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) as a PEFT-layout folder."""
    name = name if name is not None else active_adapter(model)
    configs = list_adapters(model)
    if name not in configs:
        raise KeyError(f"no adapter named {name!r} to save; the model has {sorted(configs)}")
    config = configs[name]
    layers = adapter_layers(model, name)
    tensors = {f"{PREFIX}{mname}.{suffix}": t.detach().to("cpu", copy=True).contiguous()
               for mname, layer in layers for suffix, t in layer.adapters[name].file_tensors().items()}
    fields = _config_fields(model, config, [m for m, _ in layers])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(fields, indent=2) + "\n"))
    return path


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False):
    """An adapter folder's config and tensors by module: (config, {module: {suffix: tensor}})."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {path} does not exist")
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path / CONFIG_NAME} is missing: not an adapter folder")
    fields = json.loads((path / CONFIG_NAME).read_text())
    config = config_from_fields(fields)
    tensors = _read_weights(path, allow_pickle)
    pattern = re.compile(rf"^(?:{re.escape(PREFIX)})?(.+?)\.({SUFFIXES[config.kind]})$")
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = pattern.match(_strip_adapter_name(key))
        if m is None:
            raise ValueError(f"{path / WEIGHTS_NAME}: key {key!r} is not a {config.kind} adapter "
                             f"weight (expected '<module>.{SUFFIXES[config.kind]}')")
        by_module.setdefault(m.group(1), {})[m.group(2)] = t
    if not by_module:
        raise ValueError(f"{path / WEIGHTS_NAME} holds no adapter weights")
    return config, by_module


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                 allow_pickle: bool = False) -> str:
    """Load a PEFT-layout adapter folder onto ``model`` as ``name`` (default: the folder's
    name). Everything is checked before the model is touched: a failed load leaves it as it was."""
    path = Path(path)
    name = name if name is not None else path.name
    if name in list_adapters(model):
        raise ValueError(f"the model already has an adapter named {name!r}; pass another name=")
    config, by_module = read_adapter(path, allow_pickle)
    linear = set(linear_module_names(model))
    modules = {}
    for mname, found in by_module.items():
        if mname not in linear:
            raise ValueError(f"the adapter has weights for layer {mname!r}, which this model does "
                             f"not have as a linear layer (it has e.g. {sorted(linear)[:4]}): "
                             "was it trained for another base model?")
        target = model.get_submodule(mname)
        layer = target if isinstance(target, AdapterLinear) else AdapterLinear(target)
        adapter = build_adapter(config, mname, layer, **_shape_from_file(config, found))
        expected = adapter.file_tensors()
        if set(found) != set(expected):
            raise ValueError(f"layer {mname}: the file has {sorted(found)}, expected {sorted(expected)}")
        for suffix, param in expected.items():
            if tuple(found[suffix].shape) != tuple(param.shape):
                raise ValueError(
                    f"layer {mname}: {suffix} has shape {tuple(found[suffix].shape)} in the file but "
                    f"this model needs {tuple(param.shape)} (layer is {layer.d_out}x{layer.d_in}); "
                    "the adapter was trained for a different base model")
            with torch.no_grad():
                param.copy_(found[suffix])
        modules[mname] = adapter
    attach(model, config, name, modules)
    return name


def config_from_fields(fields: dict):
    """An adapter config from the fields of an ``adapter_config.json``."""
    kind = fields.get("peft_type")
    targets = fields.get("target_modules")
    if isinstance(targets, (list, set, tuple)):
        targets = sorted(targets)
    if kind == "LORA":
        for key, neutral in UNSUPPORTED_LORA.items():
            if fields.get(key, neutral) not in (neutral, [], {}, False, None):
                raise ValueError(f"this LoRA adapter uses {key}={fields[key]!r}, which loraflow "
                                 "does not support yet; load it with PEFT instead")
        return LoRAConfig(r=fields["r"], alpha=fields.get("lora_alpha", 8), target_modules=targets,
                          dropout=fields.get("lora_dropout", 0.0) or 0.0,
                          use_rslora=bool(fields.get("use_rslora", False)),
                          rank_pattern=dict(fields.get("rank_pattern") or {}),
                          alpha_pattern=dict(fields.get("alpha_pattern") or {}))
    if kind == "FLORA":
        return FLoRAConfig(r=fields["r"], target_modules=targets,
                           init_noise=fields.get("init_noise", 0.0),
                           rank_pattern=dict(fields.get("rank_pattern") or {}))
    if kind == "DEEP_LORA":
        return DeepLoRAConfig(r=fields["r"], depth=fields["depth"], epsilon=fields["epsilon"],
                              gamma=fields.get("gamma", 0.1), target_modules=targets)
    raise ValueError(f"peft_type {kind!r} is not supported: loraflow loads LORA, FLORA and DEEP_LORA")


def _config_fields(model: nn.Module, config, adapted: list[str]) -> dict:
    targets = config.target_modules
    if targets == "all-linear":  # save the resolved names, as PEFT does
        leaves = sorted({m.rsplit(".", 1)[-1] for m in adapted})
        targets = leaves if find_targets(model, leaves) == adapted else adapted
    common = {
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "task_type": _task_type(model),
        "r": config.r,
        "target_modules": targets,
        "inference_mode": True,
    }
    if config.kind == "LORA":
        conv1d = any(is_conv1d(model.get_submodule(m).base) for m in adapted)
        return {"peft_type": "LORA", **common, "lora_alpha": config.alpha,
                "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
                "rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern,
                "fan_in_fan_out": conv1d, "bias": "none", "init_lora_weights": True,
                "use_dora": False, "modules_to_save": None, "layers_to_transform": None}
    if config.kind == "FLORA":
        return {"peft_type": "FLORA", **common, "init_noise": config.init_noise,
                "rank_pattern": config.rank_pattern}
    return {"peft_type": "DEEP_LORA", **common, "depth": config.depth, "epsilon": config.epsilon,
            "gamma": config.gamma}


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None  # PEFT's plain PeftModel: fits encoder-decoders (Whisper) and bare models


def _shape_from_file(config, found: dict[str, torch.Tensor]) -> dict:
    if config.kind == "DEEP_LORA":
        return {"width": found["deep_lora.0.weight"].shape[0]} if "deep_lora.0.weight" in found else {}
    a = found.get("lora_A.weight", found.get("flora_A.weight"))
    return {"r": a.shape[0]} if a is not None else {}


def _strip_adapter_name(key: str) -> str:
    # PEFT files written with a non-default name sometimes keep it: "...lora_A.<name>.weight"
    return re.sub(r"\.(lora_[AB]|flora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def _read_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_NAME).is_file():
        return load_file(path / WEIGHTS_NAME)
    if (path / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise ValueError(
                f"{path / PICKLE_NAME} is a pickle file, which can run code when loaded; loraflow "
                "reads adapter_model.safetensors only. Convert it, or pass allow_pickle=True if you "
                "trust its source")
        return torch.load(path / PICKLE_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path / WEIGHTS_NAME} is missing")
