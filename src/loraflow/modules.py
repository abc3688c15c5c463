"""Linear layers of any model, and which of them an adapter config targets (PEFT's rules).
Every package of loraflow may import this module; it imports none of them.

- a list of names: a module matches when its full name equals an entry or ends with
  ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- a string: a regular expression that must match the full module name (``re.fullmatch``);
- ``"all-linear"``: every linear layer except the model's output head.

Linear layers are ``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2), whose weight is
stored transposed as ``(d_in, d_out)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

# Heads that "all-linear" leaves alone: they are trained in full, never adapted (PEFT's rule).
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "proj_out", "cls")


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 style ``Conv1D``: a linear layer with weight (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear layer, whatever its storage orientation."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer, adapted ones included (by their original name: an
    adapter layer wraps the linear layer as its child ``base``)."""
    names = []
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        parent, _, leaf = name.rpartition(".")
        wrapped = leaf == "base" and hasattr(model.get_submodule(parent), "adapters")
        names.append(parent if wrapped else name)
    return names


def _head_names(model: nn.Module) -> set[str]:
    heads = {n for n, _ in model.named_children() if n in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads |= {n for n, m in model.named_modules() if m is out}
    return heads


def name_matches(name: str, target: str | Sequence[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def pattern_value(name: str, pattern: dict[str, int | float], default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the
    end of the module name (as ``(.*\\.)?key$``) wins; else ``default``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the linear modules that ``target_modules`` selects, in model order.

    Raises ``ValueError`` listing the model's linear layer names when nothing matches, or
    when a listed name matches no linear layer at all.
    """
    linear = linear_module_names(model)
    if target_modules == "all-linear":
        heads = _head_names(model)
        chosen = [n for n in linear if not any(n == h or n.startswith(h + ".") for h in heads)]
    else:
        chosen = [n for n in linear if name_matches(n, target_modules)]
        if not isinstance(target_modules, str):
            missing = [t for t in target_modules if not any(name_matches(n, [t]) for n in linear)]
            if missing:
                raise ValueError(_unknown_message(missing, linear))
    if not chosen:
        raise ValueError(_unknown_message([target_modules], linear))
    return chosen


def _unknown_message(missing: list, linear: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    return (
        f"target_modules {missing!r} match no linear layer of this model. "
        f"Its linear layers are named {leaves} ({len(linear)} layers, e.g. {linear[:3]}); "
        "pass some of these names, a regular expression over full names, or 'all-linear'."
    )


def base_weight(module: nn.Module):
    """The weight of a linear layer as (d_out, d_in), a view for Conv1D."""
    return module.weight.T if is_conv1d(module) else module.weight
