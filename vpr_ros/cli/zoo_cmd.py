"""``vpr eval zoo``: the model-zoo comparison table (train or reuse every recipe, evaluate all)."""

from __future__ import annotations

import argparse
import sys


def register_zoo(esub: argparse._SubParsersAction) -> None:
    from vpr_ros.eval.zoo import DEFAULT_RECIPES

    z = esub.add_parser(
        "zoo", help="train every zoo recipe and compare them on held-out Nordland",
        description="Train each recipe (as `vpr train`) into RUNS_DIR/<recipe name> unless a "
        "finished run of the same recipe and --set overrides is there, sharing one "
        "backbone-feature cache; then evaluate the untrained baselines (GeM p=3 on the "
        "pretrained backbone, the untrained QAA head) and every trained model on the held-out "
        "part of the route (winter queries against the summer database, +-1 file), with "
        "SelaVPR++ binary / binary + re-rank and CQVPR local re-rank variants. Writes "
        "results.json and table.md to the output folder and prints the table.")
    z.add_argument("--runs-dir", default="runs/zoo", help="training runs (default runs/zoo)")
    z.add_argument("-o", "--output", default="results/zoo",
                   help="where results.json and table.md go (default results/zoo)")
    z.add_argument("--recipes", nargs="+", metavar="YAML",
                   help="training recipes (default: config/train/{%s}_effnetlite0_nordland.yaml)"
                        % ",".join(DEFAULT_RECIPES))
    z.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every recipe, as `vpr train --set` (repeatable); "
                        "a run is reused only with the same overrides")
    z.add_argument("--retrain", action="store_true",
                   help="retrain a run folder that holds another recipe or other overrides "
                        "(default: refuse)")
    z.add_argument("--untrained-recipe", metavar="YAML",
                   help="recipe whose model, initialised but not trained, is the untrained "
                        "baseline (default: the QAA Nordland recipe)")
    z.add_argument("--gem-config", metavar="YAML",
                   help="model config of the GeM baseline (default "
                        "config/models/gem_effnetlite0.yaml, built at the recipes' test size)")
    z.add_argument("--subset", default="0.6:1.0", metavar="START:END",
                   help="held-out block of the route (default 0.6:1.0, the last 40%%)")
    z.add_argument("--tolerance", type=int, default=1,
                   help="database image i+-N is correct for query i (default 1)")
    z.add_argument("--database-season", default="summer", help="default summer")
    z.add_argument("--query-season", default="winter", help="default winter")
    z.add_argument("--rerank-top", type=int, default=100,
                   help="candidates re-ranked in the binary and local re-rank variants "
                        "(default 100)")
    z.add_argument("--batch-size", type=int, default=32)
    z.add_argument("--device", default="cpu", help="evaluation device: cpu or cuda")
    z.add_argument("--no-feature-cache", action="store_true",
                   help="encode every model in full (default: models on one frozen backbone "
                        "run their head on its held-out features, computed once)")
    z.add_argument("--no-progress", action="store_true", help="no progress bars")
    z.set_defaults(func=_zoo)


def _zoo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vpr_ros.errors import InputError
    from vpr_ros.eval.zoo import ZooOptions, run_zoo

    if args.rerank_top < 1:
        raise InputError(f"--rerank-top {args.rerank_top}: expected an integer >= 1")
    if args.tolerance < 0:
        raise InputError(f"--tolerance {args.tolerance}: expected an integer >= 0")
    opts = ZooOptions(
        runs_dir=Path(args.runs_dir), output_dir=Path(args.output),
        recipes=[Path(r) for r in args.recipes or []], overrides=list(args.overrides),
        untrained_recipe=Path(args.untrained_recipe) if args.untrained_recipe else None,
        gem_config=Path(args.gem_config) if args.gem_config else None,
        database_season=args.database_season, query_season=args.query_season,
        subset=args.subset, tolerance=args.tolerance, rerank_top=args.rerank_top,
        retrain=args.retrain, batch_size=args.batch_size, device=args.device,
        progress=not args.no_progress, feature_cache=not args.no_feature_cache)
    doc = run_zoo(opts, say=lambda line: print(line, flush=True))
    print()
    print(doc["table"], end="")
    print(f"\nwritten: {Path(args.output) / 'results.json'}, {Path(args.output) / 'table.md'} "
          f"({doc['wall_s']:.0f} s)", file=sys.stdout)
    return 0
