"""loraflow: low-rank adaptation of foundation models.

import loraflow as lf
model, tok = lf.load_model()
lf.add_adapter(model, lf.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), name="a")
lf.finetune(lf.FinetuneConfig(data="chat.jsonl", out="runs/chat"))   # = loraflow finetune
"""

from loraflow.adapters import *  # noqa: F401,F403
from loraflow.adapters import __all__ as _adapters_all
from loraflow.finetune.config import FinetuneConfig
from loraflow.finetune.loop import finetune  # lf.finetune is the function; imports name the package in full
from loraflow.models import cache_dir, llama_config, load_model
from loraflow.optim import (
    Apollo,
    ApolloAdamW8bit,
    ApolloMini,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreSGD,
    PerLayerUpdates,
    apollo_param_groups,
    galore_param_groups,
)
from loraflow.serve.engine import Engine

__version__ = "0.1.0"
__all__ = [
    *_adapters_all,
    "cache_dir",
    "llama_config",
    "load_model",
    "Engine",
    "FinetuneConfig",
    "finetune",
    "Apollo",
    "ApolloAdamW8bit",
    "ApolloMini",
    "apollo_param_groups",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreSGD",
    "PerLayerUpdates",
    "galore_param_groups",
    "__version__",
]
