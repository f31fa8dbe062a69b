"""Shared rules of the adversarial trial tests (``test_trials_*.py``).

A trial damages one input the way a hostile or unlucky user would (a flipped byte, a cut file,
an edited field, a killed writer) and asserts the project's promise about it: **a clear error or
a correct result; never a traceback, never a silently different result**. "Clear error" means a
:class:`~vpr_ros.errors.VPRError` whose message is one line (a CLI prints it as ``vpr CMD:
error: ...`` with exit code 2).

Trials are seeded and bounded so the suite stays inside CI's budget: each family draws a small
sample (offsets, fields, kill times) from a generator seeded with ``VPR_TRIAL_SEED`` (fixed by
default, so a failure reproduces) and the family's name. ``VPR_TRIAL_SCALE=10`` draws ten times
as many for a longer hunt; a failing trial's message names what was done, so it can be replayed.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from vpr_ros.errors import VPRError

SEED = int(os.environ.get("VPR_TRIAL_SEED", "20261122"))
SCALE = float(os.environ.get("VPR_TRIAL_SCALE", "1"))


def count(n: int) -> int:
    """How many trials of a family to draw: ``n`` scaled by ``VPR_TRIAL_SCALE`` (at least 1)."""
    return max(1, round(n * SCALE))


def rng(*salt: object) -> np.random.Generator:
    """A generator for one family (and sub-case): same draws for the same seed and salt."""
    digest = hashlib.sha256(repr((SEED, *salt)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def assert_clear(exc: BaseException, what: str) -> None:
    """A clear error: one of ours, one non-empty line."""
    assert isinstance(exc, VPRError), f"{what}: {type(exc).__name__} is not a VPRError: {exc}"
    text = str(exc)
    assert text.strip() and "\n" not in text, f"{what}: not a one-line message: {text!r}"
    assert "Traceback" not in text, f"{what}: message carries a traceback: {text!r}"


def assert_cli_error(proc, what: str) -> None:
    """A CLI run that failed the way a user error must: exit code 2, one ``error:`` line on
    stderr, no traceback."""
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
    assert proc.returncode == 2, f"{what}: exit code {proc.returncode}, stderr: {err[-2000:]}"
    assert "Traceback" not in err, f"{what}: traceback on stderr: {err[-2000:]}"
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, f"{what}: expected one error line, got: {err[-2000:]}"


#: A value for :func:`set_field` that deletes the field instead.
REMOVE = object()


def set_field(doc: dict, dotted: str, value) -> dict:
    """Set the field ``a.b.c`` of a nested JSON document (model.json, map.json) in place, or
    delete it when ``value`` is :data:`REMOVE`; returns ``doc``."""
    keys = dotted.split(".")
    node = doc
    for k in keys[:-1]:
        node = node[k]
    if value is REMOVE:
        node.pop(keys[-1])
    else:
        node[keys[-1]] = value
    return doc
