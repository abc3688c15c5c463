"""Memory-efficient training: GaLore optimizers and per-layer updates."""

from loraflow.optim.galore import (GaLoreAdamW, GaLoreSGD, analytic_state_bytes, galore_param_groups,
                                   state_bytes)

__all__ = ["GaLoreAdamW", "GaLoreSGD", "analytic_state_bytes", "galore_param_groups", "state_bytes"]
