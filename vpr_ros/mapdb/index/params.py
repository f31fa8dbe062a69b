"""Validation of index parameters given as plain data (YAML, CLI, ``PlaceMap.create``).

Why a helper: every kind takes a handful of integers with ranges; one function gives each the same
message shape (which parameter, what was given, what is allowed) instead of a faiss assertion.
"""

from __future__ import annotations

from typing import Any, Mapping

from vpr_ros.errors import ConfigError


def check_keys(kind: str, given: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"index kind {kind!r} has no parameter(s) {unknown}; "
                          f"its parameters are {list(allowed)}")


def int_param(kind: str, given: Mapping[str, Any], name: str, default: int | None,
              lo: int, hi: int | None = None) -> int | None:
    value = given.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"index {kind!r} parameter {name}={value!r} must be an integer")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"index {kind!r} parameter {name}={value} must be {rng}")
    return value
