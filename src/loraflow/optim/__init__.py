"""Memory-efficient training: GaLore optimizers and per-layer updates."""

from loraflow.optim.galore import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreSGD,
    analytic_state_bytes,
    galore_param_groups,
    state_bytes,
)
from loraflow.optim.per_layer import PerLayerUpdates

__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreSGD",
    "PerLayerUpdates",
    "analytic_state_bytes",
    "galore_param_groups",
    "state_bytes",
]
