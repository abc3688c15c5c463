"""Memory-efficient training: GaLore optimizers and per-layer updates."""

from loraflow.optim.galore import (GaLoreAdamW, GaLoreSGD, analytic_state_bytes, galore_param_groups,
                                   state_bytes)
from loraflow.optim.per_layer import PerLayerUpdates

__all__ = ["GaLoreAdamW", "GaLoreSGD", "PerLayerUpdates", "analytic_state_bytes", "galore_param_groups",
           "state_bytes"]
