"""The adapter kinds, one registry entry each: what the rest of loraflow asks instead of
branching on the kind (building, files, the mixed batch, the server).

An entry holds the kind's PEFT type string, its config and module classes, the regular
expression of its tensor keys in a file, how to build its module for one layer, its config
from and to the fields of an ``adapter_config.json``, the module's shape as a file shows it,
and, for additive kinds, the factors of

    Δy = scale · B A dropout(x),   A (r, d_in), B (d_out, r)

(LoRA: its A and B; Deep LoRA: A = W_1, B = W_L ⋯ W_2). FLoRA is multiplicative,

    y = Σ_k c_k ∘ (W0 (a_k ∘ x)),   A (r, d_in), C = B / r (d_out, r)

and its entry gives (A, C) instead.
Adding a kind is its own file (config and module) and one ``register(AdapterKind(...))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from loraflow.adapters.deep_lora import DeepLoRA, DeepLoRAConfig
from loraflow.adapters.flora import FLoRA, FLoRAConfig
from loraflow.adapters.lora import LoRA, LoRAConfig
from loraflow.modules import pattern_value

Factors = tuple[torch.Tensor, torch.Tensor, float, nn.Module]  # (A, B, scale, dropout)


@dataclass(frozen=True)
class AdapterKind:
    peft_type: str  # "peft_type" in adapter_config.json
    config: type
    module: type
    keys: str  # tensor key suffixes, a regex: r"lora_[AB]\.weight"
    build: Callable[..., nn.Module]  # (config, module name, d_in, d_out, shape, **device_dtype)
    from_fields: Callable[[dict, object], object]  # (fields, target_modules) -> config
    to_fields: Callable[[object, bool], dict]  # (config, fan_in_fan_out) -> the kind's own fields
    shape_from_file: Callable[[dict], dict]  # {suffix: tensor} -> what build() takes as shape
    required_keys: Callable[[dict], list[str]]  # {suffix: tensor} -> the suffixes a layer needs
    additive: Callable[[nn.Module], Factors] | None = None  # None: not additive (FLoRA)
    # multiplicative kinds, y = Σ_k c_k ∘ (W0 (a_k ∘ x)): their (A (r, d_in), C (d_out, r))
    multiplicative: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]] | None = None


KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    """Add a kind (or replace the entry of its PEFT type)."""
    KINDS[kind.peft_type] = kind
    return kind


def kind_of(obj) -> AdapterKind:
    """The entry of a config or an adapter module."""
    for kind in KINDS.values():
        if isinstance(obj, (kind.config, kind.module)):
            return kind
    raise TypeError(
        f"{type(obj).__name__} is no registered adapter kind: use one of "
        f"{[k.config.__name__ for k in KINDS.values()]}, or register its kind"
    )


def kind_named(peft_type) -> AdapterKind:
    if peft_type not in KINDS:
        raise ValueError(f"peft_type {peft_type!r} is not supported: loraflow loads {', '.join(KINDS)}")
    return KINDS[peft_type]


def required(fields: dict, key: str):
    """A field the config cannot do without, or a ValueError naming it."""
    if key not in fields:
        raise ValueError(
            f"the {fields.get('peft_type')} config has no {key!r} field; add it (PEFT "
            "writes it) or save the adapter again"
        )
    return fields[key]


def make(cls, fields: dict, **kw):
    """``cls(**kw)``, with a wrongly typed field reported as a ValueError."""
    try:
        return cls(**kw)
    except (TypeError, AttributeError) as e:  # e.g. "r": "8", target_modules: 3
        raise ValueError(
            f"the {fields.get('peft_type')} config has a field of the wrong type ({e}); "
            "fix the file or save the adapter again"
        ) from e


def _rank(config, name: str, shape: dict) -> int:
    return shape.get("r") or pattern_value(name, config.rank_pattern, config.r)


def _rank_from(key: str) -> Callable[[dict], dict]:
    return lambda found: {"r": found[key].shape[0]} if key in found else {}


# PEFT LoRA features that change the math; loading one of them would silently differ.
UNSUPPORTED_LORA = {
    "use_dora": False,
    "layers_to_transform": None,
    "lora_bias": False,
    "use_qalora": False,
}


def _lora_from_fields(fields: dict, targets) -> LoRAConfig:
    for key, neutral in UNSUPPORTED_LORA.items():
        if fields.get(key, neutral) not in (neutral, [], {}, False, None):
            raise ValueError(
                f"this LoRA adapter uses {key}={fields[key]!r}, which loraflow does not support "
                "yet; load it with PEFT instead"
            )
    return make(
        LoRAConfig,
        fields,
        r=required(fields, "r"),
        alpha=fields.get("lora_alpha", 8),
        target_modules=targets,
        dropout=fields.get("lora_dropout", 0.0) or 0.0,
        use_rslora=bool(fields.get("use_rslora", False)),
        rank_pattern=dict(fields.get("rank_pattern") or {}),
        alpha_pattern=dict(fields.get("alpha_pattern") or {}),
    )


def _lora_to_fields(config: LoRAConfig, fan_in_fan_out: bool) -> dict:
    return {
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
    }


register(
    AdapterKind(
        "LORA",
        LoRAConfig,
        LoRA,
        r"lora_[AB]\.weight",
        build=lambda c, name, d_in, d_out, shape, **kw: LoRA(
            d_in,
            d_out,
            _rank(c, name, shape),
            pattern_value(name, c.alpha_pattern, c.alpha),
            c.dropout,
            c.use_rslora,
            **kw,
        ),
        from_fields=_lora_from_fields,
        to_fields=_lora_to_fields,
        shape_from_file=_rank_from("lora_A.weight"),
        required_keys=lambda found: ["lora_A.weight", "lora_B.weight"],
        additive=lambda m: (m.A, m.B, m.scale, m.dropout),
    )
)

register(
    AdapterKind(
        "FLORA",
        FLoRAConfig,
        FLoRA,
        r"flora_[AB]\.weight",
        build=lambda c, name, d_in, d_out, shape, **kw: FLoRA(d_in, d_out, _rank(c, name, shape), c.init_noise, **kw),
        from_fields=lambda fields, targets: make(
            FLoRAConfig,
            fields,
            r=required(fields, "r"),
            target_modules=targets,
            init_noise=fields.get("init_noise", 0.0),
            rank_pattern=dict(fields.get("rank_pattern") or {}),
        ),
        to_fields=lambda c, _: {"init_noise": c.init_noise, "rank_pattern": c.rank_pattern},
        shape_from_file=_rank_from("flora_A.weight"),
        required_keys=lambda found: ["flora_A.weight", "flora_B.weight"],
        multiplicative=lambda m: (m.A, m.B / m.r),
    )
)


def _deep_lora_factors(m: DeepLoRA) -> Factors:
    b = m.factors[-1]
    for w in reversed(list(m.factors)[1:-1]):  # B = W_L ⋯ W_2
        b = b @ w
    return m.factors[0], b, 1.0, nn.Identity()


register(
    AdapterKind(
        "DEEP_LORA",
        DeepLoRAConfig,
        DeepLoRA,
        r"deep_lora\.\d+\.weight",
        build=lambda c, name, d_in, d_out, shape, **kw: DeepLoRA(
            d_in, d_out, c.depth, c.epsilon, shape.get("width"), **kw
        ),
        from_fields=lambda fields, targets: make(
            DeepLoRAConfig,
            fields,
            r=required(fields, "r"),
            depth=required(fields, "depth"),
            epsilon=required(fields, "epsilon"),
            gamma=fields.get("gamma", 0.1),
            target_modules=targets,
        ),
        to_fields=lambda c, _: {"depth": c.depth, "epsilon": c.epsilon, "gamma": c.gamma},
        shape_from_file=lambda found: (
            {"width": found["deep_lora.0.weight"].shape[0]} if "deep_lora.0.weight" in found else {}
        ),
        required_keys=lambda found: [f"deep_lora.{i}.weight" for i in range(max(2, len(found)))],
        additive=_deep_lora_factors,
    )
)
