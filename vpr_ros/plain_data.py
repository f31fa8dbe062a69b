"""Parsing the JSON and YAML files users hand us, with one way to fail.

Why one module: ``json.loads`` and ``yaml.safe_load`` fail in more ways than their documented
error types. A file of 100000 nested ``[`` exhausts Python's recursion limit (``RecursionError``),
invalid UTF-8 raises ``UnicodeDecodeError``, and a YAML file can be valid but not plain data.
Every reader of a user file (``map.json``, ``model.json``, configs, sidecars) goes through these
helpers, so each of those failures becomes the caller's :class:`~vpr_ros.errors.VPRError`
naming the file, and a new reader inherits that by using them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vpr_ros.errors import ConfigError, VPRError

#: What a malformed text can raise while being parsed (besides the parsers' own error types).
_PARSE_FAILURES: tuple[type[BaseException], ...] = (ValueError, RecursionError, MemoryError,
                                                    UnicodeDecodeError, TypeError)


def parse_json(text: str | bytes, source: str, error: type[VPRError] = ConfigError,
               advice: str = "fix or regenerate the file") -> Any:
    """``json.loads(text)``; ``error`` naming ``source`` on any malformed input."""
    try:
        return json.loads(text)
    except _PARSE_FAILURES as exc:
        raise error(f"{source}: not valid JSON ({_reason(exc)}); {advice}") from None


def parse_yaml(text: str | bytes, source: str, error: type[VPRError] = ConfigError,
               advice: str = "fix or regenerate the file") -> Any:
    """``yaml.safe_load(text)``; ``error`` naming ``source`` on any malformed input."""
    import yaml

    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, *_PARSE_FAILURES) as exc:
        raise error(f"{source}: not valid YAML ({_reason(exc)}); {advice}") from None


def read_text(path: str | Path, error: type[VPRError] = ConfigError) -> str:
    """The UTF-8 text of ``path``; ``error`` naming it when it cannot be read."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{p}: not UTF-8 text ({_reason(exc)}); the file is corrupt") from None
    except OSError as exc:
        raise error(f"{p}: cannot read ({exc.strerror or exc})") from None


def read_json(path: str | Path, error: type[VPRError] = ConfigError,
              advice: str = "fix or regenerate the file") -> Any:
    return parse_json(read_text(path, error), str(path), error, advice)


def read_yaml(path: str | Path, error: type[VPRError] = ConfigError,
              advice: str = "fix or regenerate the file") -> Any:
    return parse_yaml(read_text(path, error), str(path), error, advice)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, MemoryError):
        return "too large to parse"
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")
