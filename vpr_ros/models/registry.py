"""Name -> class registries for backbones and aggregators.

Components register themselves with a decorator, so a new backbone or aggregator plugs in by
adding one module: the config names it, :func:`build_component` checks the parameters against
the constructor's signature (unknown or missing ones are reported by name), and nothing else in
the project changes.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from vpr_ros.errors import ConfigError

T = TypeVar("T")

BACKBONES: dict[str, type] = {}
AGGREGATORS: dict[str, type] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[type[T]], type[T]]:
    def deco(cls: type[T]) -> type[T]:
        if name in table and table[name] is not cls:
            raise RuntimeError(f"{kind} {name!r} registered twice ({table[name]} and {cls})")
        table[name] = cls
        return cls
    return deco


def register_backbone(name: str) -> Callable[[type[T]], type[T]]:
    return _register(BACKBONES, "backbone", name)


def register_aggregator(name: str) -> Callable[[type[T]], type[T]]:
    return _register(AGGREGATORS, "aggregator", name)


def _ensure_builtin_components() -> None:
    # Importing the packages runs their @register decorators.
    from vpr_ros.models import aggregators, backbones  # noqa: F401


def lookup(kind: str, name: str) -> type:
    _ensure_builtin_components()
    table = BACKBONES if kind == "backbone" else AGGREGATORS
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; registered {kind}s are {sorted(table)}")
    return table[name]


def check_params(cls: type, kind: str, name: str, params: dict[str, Any],
                 injected: tuple[str, ...] = ()) -> None:
    """Reject unknown or missing constructor parameters with their names."""
    sig = inspect.signature(cls.__init__)
    accepted = {p for p in sig.parameters if p != "self"} - set(injected)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(f"{kind} {name!r}: unknown parameter(s) {unknown}; it accepts "
                          f"{sorted(accepted)}")
    missing = sorted(p.name for p in sig.parameters.values()
                     if p.name not in ("self", *injected) and p.default is inspect.Parameter.empty
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                     and p.name not in params)
    if missing:
        raise ConfigError(f"{kind} {name!r}: required parameter(s) {missing} not given")


def build_component(kind: str, name: str, params: dict[str, Any], **injected: Any) -> Any:
    """Instantiate a registered component, turning bad parameter values into ConfigError."""
    cls = lookup(kind, name)
    check_params(cls, kind, name, params, tuple(injected))
    try:
        return cls(**injected, **params)
    except (ValueError, TypeError, RuntimeError, OverflowError, MemoryError) as exc:
        # RuntimeError/MemoryError: torch could not allocate what a parameter asked for.
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConfigError(f"{kind} {name!r}: {first[:200]}; check its parameters") from exc
