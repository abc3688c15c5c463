"""Adapter kinds (LoRA, FLoRA, Deep LoRA), their injection into any model, and their files."""

from loraflow.adapters.compress import compress, deep_lora_param_groups
from loraflow.adapters.deep_lora import DeepLoRA, DeepLoRAConfig
from loraflow.adapters.files import load_adapter, save_adapter
from loraflow.adapters.flora import FLoRA, FLoRAConfig
from loraflow.adapters.layer import AdapterLinear, adapter_layers
from loraflow.adapters.lora import LoRA, LoRAConfig
from loraflow.adapters.manage import (
    active_adapter,
    adapter_parameters,
    add_adapter,
    delete_adapter,
    list_adapters,
    mark_trainable,
    merge_adapter,
    set_adapter,
    unmerge_adapter,
    use_adapters,
)

__all__ = [
    "AdapterLinear",
    "DeepLoRA",
    "DeepLoRAConfig",
    "FLoRA",
    "FLoRAConfig",
    "LoRA",
    "LoRAConfig",
    "active_adapter",
    "adapter_layers",
    "adapter_parameters",
    "add_adapter",
    "compress",
    "deep_lora_param_groups",
    "delete_adapter",
    "list_adapters",
    "load_adapter",
    "mark_trainable",
    "merge_adapter",
    "save_adapter",
    "set_adapter",
    "unmerge_adapter",
    "use_adapters",
]
