"""The ``vpr`` command: a thin argument parser over the library.

Each subcommand group lives in its own module exposing ``register(subparsers)``; modules import
torch, faiss or rclpy only inside their handlers so ``vpr --help`` stays instant. Errors of the
project's own hierarchy are printed as one clear line (exit code 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from vpr_ros.errors import VPRError

# Subcommand modules, in the order `vpr --help` lists them.
COMMAND_MODULES = [
    "vpr_ros.cli.demo_cmd",
    "vpr_ros.cli.model_cmd",
    "vpr_ros.cli.train_cmd",
    "vpr_ros.cli.eval_cmd",
    "vpr_ros.cli.map_cmd",
    "vpr_ros.cli.bag_cmd",
    "vpr_ros.cli.export_cmd",
    "vpr_ros.cli.bench_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vpr", description="Visual place recognition for ROS 2: models, maps, training, "
        "evaluation, export, benchmarks and the end-to-end demo.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from vpr_ros._bootstrap import ensure_ros_libs

    if argv is None:
        ensure_ros_libs()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except VPRError as exc:
        print(f"vpr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A path the user gave that the system refuses (not a directory, no permission, disk
        # full): the user's to fix, so one line too. --verbose keeps the traceback.
        logging.getLogger("vpr").debug("OS error", exc_info=True)
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"vpr {args.command}: error: {where}{exc.strerror or exc} (check the path and "
              "its permissions)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
