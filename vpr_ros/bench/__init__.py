"""Benchmarks behind `vpr bench`: each module measures one piece (search, encoder, node) and
returns plain dicts, so the CLI can print a table or JSON and docs can quote the same figures."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """argparse type for ``--n 10000,1000000``: the benchmarks' size lists, shared by every
    ``vpr bench`` sub-command so a bad list gets the same one-line error everywhere."""
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 100000,1000000")
    return values
