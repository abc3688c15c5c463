"""Memory-efficient training: GaLore and APOLLO optimizers, per-layer updates."""

from loraflow.optim.apollo import Apollo, ApolloAdamW8bit, ApolloMini, apollo_param_groups
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
    "Apollo",
    "ApolloAdamW8bit",
    "ApolloMini",
    "apollo_param_groups",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreSGD",
    "PerLayerUpdates",
    "analytic_state_bytes",
    "galore_param_groups",
    "state_bytes",
]
