"""``vpr train --config YAML``: run a training recipe (config/train/*.yaml)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a recipe (config/train/*.yaml)",
                       description="Train with Lightning from a recipe; the result is a model "
                       "directory (<output>/model) that every other tool loads. Multi-GPU and "
                       "multi-node runs: set trainer.devices/num_nodes/strategy and launch the "
                       "same command on every node (torchrun or SLURM).")
    p.add_argument("--config", required=True, help="training recipe YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set trainer.max_steps=100 "
                        "--set data.train.0.places_per_batch=16 (repeatable; values are YAML)")
    p.add_argument("-o", "--output", help="output folder (default: the recipe's 'output')")
    p.add_argument("--resume", metavar="CKPT|auto",
                   help="continue from a Lightning checkpoint; 'auto' = <output>/checkpoints/"
                        "last.ckpt if present")
    p.add_argument("--check", action="store_true",
                   help="validate the recipe (and build the model) without training")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vpr_ros.train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    if args.check:
        from vpr_ros.train.run import build_training_model

        model, train_size, test_size = build_training_model(cfg)
        print(f"{args.config}: OK ({cfg.name}: {model.config.backbone.name} + "
              f"{model.config.aggregator.name}, {model.descriptor_dim}-D, train {train_size}, "
              f"test {test_size}, {len(cfg.data.train)} dataset(s))")
        return 0
    from vpr_ros.train.run import train

    result = train(cfg, resume=args.resume, output=Path(args.output) if args.output else None)
    if result.global_rank != 0:
        return 0  # DDP: the other processes trained too; rank 0 reports
    summary = {"model_dir": str(result.model_dir), "fingerprint": result.fingerprint,
               "steps": result.steps, "timings_s": result.timings,
               "loss_first": result.losses[0] if result.losses else None,
               "loss_last": result.losses[-1] if result.losses else None,
               "validation": result.validation}
    if args.json:
        print(json.dumps(summary, indent=2))
    elif result.steps == 0:
        print(f"saved the initial (untrained) model: {result.model_dir} (fingerprint "
              f"{result.fingerprint})")
    else:
        print(f"trained {result.steps} steps in {result.wall_s:.0f} s; model directory "
              f"{result.model_dir} (fingerprint {result.fingerprint})")
    return 0
