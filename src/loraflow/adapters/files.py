"""Adapter folders in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module name>.<suffix>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. LoRA folders are
PEFT's own format (``peft_type: "LORA"``) and load in ``peft.PeftModel.from_pretrained``;
FLoRA (``"FLORA"``, suffixes ``flora_A/B.weight``) and Deep LoRA (``"DEEP_LORA"``,
``deep_lora.<i>.weight``) use the same layout with loraflow-only fields.

A folder is written as one unit (a temporary folder beside it, fsynced, then swapped in), so
a reader sees a whole adapter, old or new; weights are read from safetensors only (a pickled
``adapter_model.bin`` is refused unless ``allow_pickle=True``) and checked: finite, complete,
inside the folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loraflow.adapters.kinds import kind_named
from loraflow.adapters.layer import AdapterLinear, adapter_layers
from loraflow.adapters.manage import active_adapter, attach, list_adapters
from loraflow.atomic import atomic_write_dir, recover_dir
from loraflow.modules import find_targets, is_conv1d, linear_module_names, pattern_value

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME}  # what save_adapter may replace
PREFIX = "base_model.model."


def save_adapter(
    model: nn.Module, path: str | os.PathLike, name: str | None = None, modules_to_save: list[str] | None = None
) -> Path:
    """Write adapter ``name`` (default: the active one) as a PEFT-layout folder at ``path``.

    ``modules_to_save`` names whole modules trained with the adapter (a classifier's
    ``score`` head): their weights are saved beside the adapter's, as PEFT does.

    The folder is written as one unit (``atomic_write_dir``): both files go into a temporary
    folder beside ``path``, which then takes its place, so a reader (``load_adapter``, the
    server) sees the previous adapter or this one, never one's weights with the other's config.
    An existing ``path`` is replaced only if it is an adapter folder (nothing in it but
    adapter_config.json, adapter_model.safetensors or adapter_model.bin) or empty; anything
    else raises ValueError and is left untouched.
    """
    tensors, fields = adapter_files(model, name, modules_to_save)
    path = Path(path)
    _check_replaceable(path)

    def write(folder: Path) -> None:
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(fields, indent=2) + "\n")

    atomic_write_dir(path, write)
    return path


def adapter_files(
    model: nn.Module, name: str | None = None, modules_to_save: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """What ``save_adapter`` writes: the tensors of adapter ``name`` (and of the modules in
    ``modules_to_save``) by their keys in the weights file, and the config's fields."""
    name = name if name is not None else active_adapter(model)
    configs = list_adapters(model)
    if name not in configs:
        raise KeyError(f"no adapter named {name!r} to save; the model has {sorted(configs)}")
    config = configs[name]
    layers = adapter_layers(model, name)
    tensors = {
        f"{PREFIX}{mname}.{suffix}": t.detach().to("cpu", copy=True).contiguous()
        for mname, layer in layers
        for suffix, t in layer.adapters[name].file_tensors().items()
    }
    for module in modules_to_save or []:
        for key, t in model.get_submodule(module).state_dict().items():
            tensors[f"{PREFIX}{module}.{key}"] = t.detach().to("cpu", copy=True).contiguous()
    fields = _config_fields(model, config, [m for m, _ in layers])
    if modules_to_save:
        fields["modules_to_save"] = list(modules_to_save)
    return tensors, fields


def _check_replaceable(path: Path) -> None:
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in ADAPTER_FILES)
        if others:
            raise ValueError(
                f"{path} holds other files than an adapter's ({', '.join(others[:5])}); "
                "saving would replace the whole folder. Save to another folder, or move "
                "those files away"
            )
    elif path.exists():
        raise ValueError(f"{path} exists and is not a folder; save the adapter to another path")


# Reading ------------------------------------------------------------------------------------
# Bounds on what an adapter file may hold: far beyond anything training makes (a trained LoRA
# factor's entries stay below ~10, PEFT's lora_alpha is 8 to a few hundred), low enough to
# refuse garbage (values x1e30, an alpha of 1e38) that would turn every output into Inf / NaN.
MAX_WEIGHT = 1e4  # the largest |w| accepted in an adapter's tensors
MAX_ALPHA = 1e5  # the largest lora_alpha (and alpha_pattern value) accepted
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class AdapterFileError(ValueError):
    """An adapter folder that cannot be used. ``problem`` says what is wrong, naming the file
    by its base name, the field or layer and the value, and the fix. ``str()`` adds the folder,
    for a local user (a problem that begins with a file's name reads as that file's path);
    ``brief(name)`` the adapter's name instead, for a server's clients, who should not learn
    the server's paths."""

    def __init__(self, folder: str | os.PathLike, problem: str, local: str | None = None):
        self.folder, self.problem = Path(folder), problem
        if local is None:
            starts = problem.split(" ", 1)[0].rstrip(":")
            local = f"{self.folder / problem}" if starts in ADAPTER_FILES else f"adapter {self.folder}: {problem}"
        super().__init__(local)

    def brief(self, name: str) -> str:
        return f"adapter {name!r}: {self.problem}"

    def __reduce__(self):  # picklable (to another process) with its three arguments
        return type(self), (self.folder, self.problem, str(self))


class AdapterFileMissing(AdapterFileError, FileNotFoundError):
    """An adapter folder, or one of its files, that does not exist."""


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False):
    """An adapter folder's config and tensors by module: (config, {module: {suffix: tensor}}),
    for an adapter alone: one that also holds trained modules (PEFT's ``modules_to_save``, a
    classifier's head) is refused with a ValueError; ``read_adapter_files`` reads those too."""
    config, by_module, saved = read_adapter_files(path, allow_pickle)
    if saved:
        raise AdapterFileError(
            path,
            f"{CONFIG_NAME} lists trained modules {sorted(saved)} (modules_to_save: a classifier's head, "
            "saved by loraflow finetune --task classification): the adapter works only with those modules, on "
            "the model they were trained with; load it with lf.load_adapter on such a model, score it with "
            "loraflow eval --adapter, or describe it with loraflow inspect",
        )
    return config, by_module


def read_adapter_files(path: str | os.PathLike, allow_pickle: bool = False):
    """An adapter folder's config, tensors by module, and the tensors of the whole modules
    saved with it: (config, {module: {suffix: tensor}}, {module: {param: tensor}}).

    Everything is checked; every failure is an ``AdapterFileError`` (a ValueError; for a
    missing folder or file ``AdapterFileMissing``, also a FileNotFoundError) naming the file,
    the field or layer, the value and the fix:

    * adapter_config.json: not a JSON object, a field missing or of the wrong type, a
      ``lora_alpha`` (or ``alpha_pattern`` value) that is not a finite number in
      (0, ``MAX_ALPHA``];
    * the weights: a truncated or corrupt file, a layer without all of its tensors (lora_A but
      no lora_B), a rank that is not the config's ``r`` / ``rank_pattern`` for that layer
      (config and weights of different saves), tensors that are not floating point, NaN or
      Inf values, or values beyond ±``MAX_WEIGHT``;
    * adapter_config.json / the weights file being a symlink to somewhere outside the folder
      (the folder itself may be a symlink).

    If ``path`` is missing because a ``save_adapter`` was killed between the two renames of its
    fallback swap (systems without an atomic exchange), the whole previous adapter is at
    ``.NAME.old`` beside it: that one is read, with a warning, and the next save cleans up.
    """
    path = _existing_folder(Path(path))
    fields = _read_fields(path)
    _check_alphas(path, fields)
    try:
        config = config_from_fields(fields)
    except ValueError as e:
        raise AdapterFileError(path, f"{CONFIG_NAME}: {e}") from e
    tensors = _read_weights(path, allow_pickle)
    saved = _saved_modules(path, fields, tensors)  # pops their tensors
    pattern = re.compile(rf"^(?:{re.escape(PREFIX)})?(.+?)\.({kind_named(config.kind).keys})$")
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = pattern.match(_strip_adapter_name(key))
        if m is None:
            raise AdapterFileError(
                path,
                f"{WEIGHTS_NAME}: key {key!r} is not a {config.kind} adapter "
                f"weight (expected '<module>.{kind_named(config.kind).keys}')",
            )
        by_module.setdefault(m.group(1), {})[m.group(2)] = t
    if not by_module:
        raise AdapterFileError(path, f"{WEIGHTS_NAME} holds no adapter weights")
    for module, found in by_module.items():
        _check_layer(path, config, module, found)
    return config, by_module, saved


def _existing_folder(path: Path) -> Path:
    """``path``, or the whole previous folder a killed save parked beside it (with a warning)."""
    if path.is_dir():
        return path
    parked = recover_dir(path)
    if parked is None or not (parked / CONFIG_NAME).is_file():
        raise AdapterFileMissing(path, "its folder does not exist", local=f"adapter folder {path} does not exist")
    warnings.warn(
        f"adapter folder {path} is missing: a save over it was interrupted; reading the "
        f"previous version from {parked}. Save the adapter again to finish",
        stacklevel=3,
    )
    return parked


def _read_fields(path: Path) -> dict:
    config_file = _inside(path, CONFIG_NAME)
    if not config_file.is_file():
        raise AdapterFileMissing(path, f"{CONFIG_NAME} is missing: not an adapter folder")
    try:
        return json.loads(config_file.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise AdapterFileError(
            path, f"{CONFIG_NAME} is not valid JSON ({e}); save the adapter again or fix the file"
        ) from e


def _check_alphas(path: Path, fields) -> None:
    """``lora_alpha`` and each ``alpha_pattern`` value: a finite number in (0, MAX_ALPHA]."""
    if not isinstance(fields, dict) or fields.get("peft_type") != "LORA":
        return  # not a LoRA config: config_from_fields names what is wrong
    pattern = fields.get("alpha_pattern") or {}
    named = {"lora_alpha": fields.get("lora_alpha", 8)}
    if isinstance(pattern, dict):
        named.update({f"alpha_pattern[{k!r}]": v for k, v in pattern.items()})
    for field, value in named.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not 0 < value <= MAX_ALPHA:
            raise AdapterFileError(
                path,
                f"{CONFIG_NAME}: {field} is {value!r}; it must be a finite number in (0, {MAX_ALPHA:g}] "
                "(LoRA scales its update by alpha / r; PEFT's default is 8, common values 16 to 128): set it "
                "to the alpha the adapter was trained with, or save the adapter again",
            )


def _saved_modules(path: Path, fields: dict, tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Take the tensors of the config's ``modules_to_save`` out of ``tensors``, by module."""
    names = fields.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise AdapterFileError(path, f"{CONFIG_NAME}: modules_to_save must be a list of module names, got {names!r}")
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(tensors):
        bare = key.removeprefix(PREFIX)
        for name in names:
            if bare.startswith(name + ".") and "." not in bare[len(name) + 1 :]:
                saved.setdefault(name, {})[bare[len(name) + 1 :]] = tensors.pop(key)
    for name, found in saved.items():
        for param, t in found.items():
            if t.is_floating_point():
                _check_values(path, f"saved module {name}", param, t)
    missing = [n for n in names if n not in saved]
    if missing:
        raise AdapterFileError(
            path,
            f"{CONFIG_NAME} lists modules_to_save {missing} but {WEIGHTS_NAME} lacks them; save the adapter again",
        )
    return saved


def _check_layer(path: Path, config, module: str, found: dict[str, torch.Tensor]) -> None:
    """One layer's tensors: all there, of the config's rank, floating point, finite, bounded."""
    kind = kind_named(config.kind)
    needed = kind.required_keys(found)
    missing = [k for k in needed if k not in found]
    if missing:
        raise AdapterFileError(
            path,
            f"layer {module} has {sorted(found)} but no {', '.join(missing)} in {WEIGHTS_NAME}; "
            "the weights file is incomplete: save or convert the adapter again",
        )
    for suffix, t in found.items():
        if t.dtype not in WEIGHT_DTYPES:
            raise AdapterFileError(
                path,
                f"layer {module}: {suffix} is {str(t.dtype).removeprefix('torch.')} in {WEIGHTS_NAME}; adapter "
                "weights are floating point (float32, bfloat16, float16): save the adapter again from its model",
            )
    _check_rank(path, config, module, found)
    for suffix, t in found.items():
        _check_values(path, f"layer {module}", suffix, t)


def _check_rank(path: Path, config, module: str, found: dict[str, torch.Tensor]) -> None:
    """The rank the tensors have is the one adapter_config.json gives the layer (``r``, or
    ``rank_pattern``'s entry): else the scale alpha / r would be computed with another rank."""
    if not hasattr(config, "rank_pattern"):
        return  # Deep LoRA: its width is the file's own
    has = kind_named(config.kind).shape_from_file(found).get("r")
    says = pattern_value(module, config.rank_pattern, config.r)
    if has is not None and has != says:
        source = "its rank_pattern" if says != config.r else f"r = {config.r}"
        raise AdapterFileError(
            path,
            f"layer {module} has rank {has} in {WEIGHTS_NAME} but {CONFIG_NAME} gives it rank {says} ({source}): "
            "the config and the weights are of different saves; save the adapter again (or set r / "
            "rank_pattern to the weights' ranks)",
        )


def _check_values(path: Path, owner: str, suffix: str, t: torch.Tensor) -> None:
    """No NaN or Inf, and no |value| above MAX_WEIGHT."""
    if not torch.isfinite(t).all():
        what = " and ".join(w for w, bad in (("NaN", t.isnan().any()), ("Inf", t.isinf().any())) if bad)
        raise AdapterFileError(
            path, f"{owner} has non-finite values in {suffix} ({what}); retrain or fix {WEIGHTS_NAME}"
        )
    peak = float(t.abs().max()) if t.numel() else 0.0
    if peak > MAX_WEIGHT:
        raise AdapterFileError(
            path,
            f"{owner} has values up to {peak:.3g} in {suffix}, beyond the |w| <= {MAX_WEIGHT:g} that trained "
            f"adapters stay far within: {WEIGHTS_NAME} is corrupt or was scaled; retrain or save the adapter again",
        )


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, allow_pickle: bool = False) -> str:
    """Load a PEFT-layout adapter folder onto ``model`` as ``name`` (default: the folder's
    name). Everything is checked before the model is touched: a failed load leaves it as it was."""
    path = Path(path)
    name = name if name is not None else path.name
    if name in list_adapters(model):
        raise ValueError(f"the model already has an adapter named {name!r}; pass another name=")
    config, by_module, saved = read_adapter_files(path, allow_pickle)
    linear = set(linear_module_names(model))
    modules = {}
    for mname, found in by_module.items():
        if mname not in linear:
            raise ValueError(
                f"the adapter has weights for layer {mname!r}, which this model does "
                f"not have as a linear layer (it has e.g. {sorted(linear)[:4]}): "
                "was it trained for another base model?"
            )
        target = model.get_submodule(mname)
        layer = target if isinstance(target, AdapterLinear) else AdapterLinear(target)
        w = layer.base.weight
        modules[mname] = adapter_from_file(config, mname, layer.d_in, layer.d_out, found, w.device, w.dtype)
    states = {module: _saved_state(model, path, module, found) for module, found in saved.items()}
    attach(model, config, name, modules)
    for module, state in states.items():  # like PEFT: the saved modules take the file's weights
        model.get_submodule(module).load_state_dict(state)
    return name


def _saved_state(model: nn.Module, path: Path, module: str, found: dict[str, torch.Tensor]) -> dict:
    """The state of saved module ``module`` checked against the model's (names and shapes)."""
    try:
        own = model.get_submodule(module).state_dict()
    except AttributeError:
        raise AdapterFileError(
            path,
            f"it was saved with a trained module {module!r} (e.g. a classifier head) that this "
            f"model ({type(model).__name__}) lacks; load it on the model it was trained with",
        ) from None
    if set(own) != set(found) or any(own[k].shape != found[k].shape for k in own):
        shapes = {k: tuple(v.shape) for k, v in found.items()}
        raise AdapterFileError(
            path,
            f"saved module {module} has {shapes} but this model's has "
            f"{ {k: tuple(v.shape) for k, v in own.items()} } (another number of classes?)",
        )
    return {k: t.to(own[k].device, own[k].dtype) for k, t in found.items()}


def adapter_from_file(
    config, module_name: str, d_in: int, d_out: int, found: dict[str, torch.Tensor], device=None, dtype=None
) -> nn.Module:
    """The adapter module of one (d_out x d_in) layer from its tensors in a file; ValueError
    naming the layer when its keys or shapes do not fit the layer."""
    kind = kind_named(config.kind)
    # built on the meta device, then given memory: no initialization that the file overwrites
    # (a wide Deep LoRA's orthogonal init took 3.6 s a 4096x4096 layer on the CPU, this 0.2 ms)
    shape = kind.shape_from_file(found)
    adapter = kind.build(config, module_name, d_in, d_out, shape, device="meta", dtype=dtype)
    adapter = adapter.to_empty(device=device if device is not None else "cpu")
    expected = adapter.file_tensors()
    if set(found) != set(expected):
        raise ValueError(f"layer {module_name}: the file has {sorted(found)}, expected {sorted(expected)}")
    for suffix, param in expected.items():
        if tuple(found[suffix].shape) != tuple(param.shape):
            raise ValueError(
                f"layer {module_name}: {suffix} has shape {tuple(found[suffix].shape)} in the file but "
                f"this model needs {tuple(param.shape)} (layer is {d_out}x{d_in}); "
                "the adapter was trained for another base model"
            )
        with torch.no_grad():
            param.copy_(found[suffix])
    return adapter


def config_from_fields(fields: dict):
    """An adapter config from the fields of an ``adapter_config.json``; ValueError (naming
    the field) when it is not a JSON object, lacks a required field or has a bad value."""
    if not isinstance(fields, dict):
        raise ValueError(f"the config must be a JSON object, got {type(fields).__name__}")
    kind = kind_named(fields.get("peft_type"))
    targets = fields.get("target_modules")
    if isinstance(targets, (list, set, tuple)):
        targets = sorted(targets)
    return kind.from_fields(fields, targets)


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
    conv1d = any(is_conv1d(model.get_submodule(m).base) for m in adapted)
    return {"peft_type": config.kind, **common, **kind_named(config.kind).to_fields(config, conv1d)}


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None  # PEFT's plain PeftModel: fits encoder-decoders (Whisper) and bare models


def _strip_adapter_name(key: str) -> str:
    # PEFT files written with a non-default name sometimes keep it: "...lora_A.<name>.weight"
    return re.sub(r"\.(lora_[AB]|flora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused if it is a symlink that leads out of ``folder``."""
    file = folder / name
    if file.is_symlink() and not file.resolve().is_relative_to(folder.resolve()):
        raise AdapterFileError(
            folder,
            f"{name} is a symlink to outside the adapter folder; copy the file into the folder instead",
            local=f"{name} is a symlink to {file.resolve()}, outside the adapter folder; copy the file into "
            f"{folder} instead",
        )
    return file


def _read_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weights = _inside(path, WEIGHTS_NAME)
    if weights.is_file():
        try:
            return load_file(weights)
        except SafetensorError as e:
            raise AdapterFileError(
                path,
                f"{WEIGHTS_NAME} is not a readable safetensors file ({e}): it may be truncated "
                "or corrupt; save the adapter again",
            ) from e
    pickled = _inside(path, PICKLE_NAME)
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterFileError(
                path,
                f"{PICKLE_NAME} is a pickle file, which can run code when loaded; loraflow "
                f"reads {WEIGHTS_NAME} only. Convert it, or pass allow_pickle=True if you trust its source",
            )
        try:
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle and zip errors of every kind
            raise AdapterFileError(
                path, f"{PICKLE_NAME} could not be read ({type(e).__name__}: {e}): it may be truncated or corrupt"
            ) from e
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterFileError(path, f"{PICKLE_NAME} does not hold a dict of tensors")
        return tensors
    raise AdapterFileMissing(path, f"{WEIGHTS_NAME} is missing")
