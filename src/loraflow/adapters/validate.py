"""Checks shared by the adapter configs: each names the field and what to pass instead."""

from __future__ import annotations

import math


def check_positive(name: str, value, integer: bool = False) -> None:
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")  # NaN fails `0 < value` too


def check_targets(target_modules):
    """A regex string, 'all-linear', or a non-empty list of module names (returned as a list)."""
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError(
                "target_modules must not be empty: pass names like ['q_proj'], a regular expression, or 'all-linear'"
            )
        return target_modules
    names = list(target_modules)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"target_modules must be a non-empty list of module names, a regular "
            f"expression, or 'all-linear'; got {target_modules!r}"
        )
    return names
