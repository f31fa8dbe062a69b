"""Declared, range-checked parameters for the decision configs.

Each config field carries its range and a one-line description in its dataclass metadata
(:func:`param`). One declaration then serves three readers: the config's own validation (a bad
value is a :class:`~vpr_ros.errors.ConfigError` naming the field, its range and the fix), the
YAML / dict loader (unknown keys are refused instead of silently ignored), and the ROS node,
which declares every tunable as a parameter with a description and a range
(:func:`parameter_specs`) without restating them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Self, Sequence, TypeVar

from vpr_ros.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class ParamSpec:
    """A tunable as the node declares it: name, default, type, inclusive range, description."""

    name: str
    default: Any
    type: type
    low: Optional[float]
    high: Optional[float]
    description: str


def param(default: Any, description: str, low: Optional[float] = None,
          high: Optional[float] = None) -> Any:
    """A dataclass field with an inclusive ``[low, high]`` range and a description."""
    return dataclasses.field(default=default,
                             metadata={"low": low, "high": high, "description": description})


def _field_type(f: dataclasses.Field[Any]) -> type:
    """The field's runtime type, from its default (annotations are strings under PEP 563)."""
    return type(f.default)


def validate(config: Any) -> None:
    """Check every declared field of ``config`` for type, finiteness and range."""
    cls = type(config)
    name = cls.__name__
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = _field_type(f)
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{name}.{f.name} = {value!r} must be true or false")
            continue
        # numbers.* rather than int/float: numpy scalars from scripts are fine values too.
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name}.{f.name} = {value!r} must be an integer")
            value = int(value)
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"{name}.{f.name} = {value!r} must be a number")
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{name}.{f.name} = {value!r} must be finite")
        object.__setattr__(config, f.name, value)
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise ConfigError(
                f"{name}.{f.name} = {value!r} is out of range {bounds}: "
                f"{f.metadata.get('description', '')}"
            )


def from_mapping(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build a config from a dict (YAML, ROS parameters), refusing keys it does not know.

    A misspelt key would otherwise leave its default silently in force, which in a loop-closure
    detector means wrong edges in a SLAM graph with nothing in the logs.
    """
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{cls.__name__} has no parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return cls(**dict(values))


def parameter_specs(cls: type) -> list[ParamSpec]:
    """Every field of a config class as a :class:`ParamSpec`, in declaration order."""
    return [
        ParamSpec(name=f.name, default=f.default, type=_field_type(f),
                  low=f.metadata.get("low"), high=f.metadata.get("high"),
                  description=f.metadata.get("description", ""))
        for f in dataclasses.fields(cls)
    ]


class Tunables:
    """Base of the configs whose fields are :func:`param` declarations (decision stages, the
    nodes, the pose graph): the loader and the node's declarations come from the fields, so
    no config restates them."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """From a dict (YAML section, ROS parameters); unknown keys are a ConfigError."""
        return from_mapping(cls, values)

    @classmethod
    def parameter_specs(cls) -> list[ParamSpec]:
        """Name, default, type, range and description of every field, for the node to declare."""
        return parameter_specs(cls)


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (cross-field rules)."""
    if not condition:
        raise ConfigError(message)


def require_choices(config: Any, choices: Mapping[str, Sequence[str]]) -> None:
    """ConfigError unless every string field named in ``choices`` holds one of its values
    (the node configs' modes and QoS names, checked the same way everywhere)."""
    for name, allowed in choices.items():
        value = getattr(config, name)
        require(value in allowed, f"parameter {name} = {value!r} must be one of "
                f"{', '.join(allowed)}")


def renamed_specs(cls: Any, rename: Callable[[str], str]) -> list[ParamSpec]:
    """``cls.parameter_specs()`` under the names a node declares them by (a section prefix,
    another node's names), everything else unchanged."""
    return [dataclasses.replace(s, name=rename(s.name)) for s in cls.parameter_specs()]


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)  # always a float literal (ROS refuses 1 for a double parameter)
    return str(value)


def render_section(name: str, specs: list[ParamSpec], values: Optional[Mapping[str, Any]] = None,
                   indent: int = 6, width: int = 92) -> list[str]:
    """YAML lines of one parameter section (``name:`` then each tunable with its description
    as a comment and its range trailing), the layout of ``config/*.yaml``: so files the tools
    write (calibration) read like the shipped ones."""
    import textwrap

    pad = " " * indent
    lines = [" " * (indent - 2) + f"{name}:"]
    for spec in specs:
        value = spec.default if values is None or spec.name not in values else values[spec.name]
        if spec.type is float:
            value = float(value)
        for text in textwrap.wrap(spec.description, width - indent - 2):
            lines.append(f"{pad}# {text}")
        line = f"{pad}{spec.name}: {_yaml_value(value)}"
        if spec.type in (int, float) and (spec.low is not None or spec.high is not None):
            low = "-inf" if spec.low is None else spec.low
            high = "inf" if spec.high is None else spec.high
            line += f"  # [{low}, {high}]"
        lines.append(line)
    return lines
