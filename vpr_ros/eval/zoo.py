"""``vpr eval zoo``: train every recipe of the model zoo and compare them on held-out data.

Why one command: the model-zoo comparison is only worth something if every row comes
from the same frozen backbone, the same training budget, the same split and the same
evaluation. This trains each recipe with the code of ``vpr train`` (reusing finished runs),
shares one backbone-feature cache, adds the untrained baselines, and evaluates every model and
variant with the code of ``vpr eval recall``, so any row can be reproduced by that command.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from vpr_ros.errors import InputError
from vpr_ros.eval.search_plan import SearchPlan, plan_search
from vpr_ros.eval.zoo_runs import ZooModel, ensure_run, pretrained_gem

if TYPE_CHECKING:
    from vpr_ros.eval.backbone_cache import HeldOutFeatures

#: The zoo's six Nordland recipes (config/train/<name>_effnetlite0_nordland.yaml).
DEFAULT_RECIPES = ("gem", "qaa", "boq", "dcvlaq", "selavpr", "cqvpr")
METHOD_NAMES = {"gem": "GeM", "qaa": "QAA", "boq": "BoQ", "vlaq": "VLAQ", "selavpr": "SelaVPR++",
                "cqvpr": "CQVPR"}


def default_recipe(name: str) -> Path:
    from vpr_ros.resources import config_file

    return config_file("train", f"{name}_effnetlite0_nordland.yaml")


@dataclass
class ZooOptions:
    """What ``vpr eval zoo`` trains and how it evaluates (by default the Nordland route split of
    docs/results_nordland.md: train on the first 60 %, hold out the last 40 %)."""

    runs_dir: Path
    output_dir: Path
    recipes: Sequence[Path] = ()
    overrides: Sequence[str] = ()
    untrained_recipe: Optional[Path] = None   # default: the qaa recipe
    gem_config: Optional[Path] = None          # default: config/models/gem_effnetlite0.yaml
    database_season: str = "summer"
    query_season: str = "winter"
    subset: str = "0.6:1.0"
    tolerance: int = 1
    ks: Sequence[int] = (1, 5, 10)
    rerank_top: int = 100
    retrain: bool = False
    batch_size: int = 32
    device: str = "cpu"
    progress: bool = True
    #: models sharing one backbone (same weights, preprocessing) run only their head on its
    #: held-out features, computed once and kept in ``runs_dir/feature_cache``
    feature_cache: bool = True


def variants(output_names: Sequence[str], top: int) -> list[tuple[str, SearchPlan]]:
    """The table rows of one model: float always; Hamming only and Hamming + float re-rank for
    a hash head; with and without local re-rank for a local head (as the node can search)."""
    out = [("float", plan_search(output_names, "flat"))]
    if "binary" in output_names:
        out.append(("binary (Hamming only)", plan_search(output_names, "binary", rerank=0)))
        out.append((f"binary + float re-rank {top}",
                    plan_search(output_names, "binary", rerank=top)))
    if "local" in output_names:
        out.append((f"float + local re-rank {top}",
                    plan_search(output_names, "flat", local_rerank=True, local_rerank_top=top)))
    return out


def method_name(model_dir: Path, training: str) -> str:
    from vpr_ros.models.model_dir import read_model_meta

    agg = read_model_meta(model_dir).config.aggregator
    name = METHOD_NAMES.get(agg.name, agg.name)
    if agg.name == "gem" and agg.params.get("out_dim"):
        name = "GeM + FC"
    if training != "trained":
        name += f" ({training})"
    return name


def run_zoo(opts: ZooOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or reuse), evaluate, and write ``results.json`` and ``table.md``."""
    from vpr_ros.train.config import load_train_config

    recipes = [Path(r) for r in opts.recipes] or [default_recipe(n) for n in DEFAULT_RECIPES]
    untrained = Path(opts.untrained_recipe or default_recipe("qaa"))
    gem_cfg = Path(opts.gem_config or _gem_config())
    runs, cache = Path(opts.runs_dir), Path(opts.runs_dir) / "feature_cache"
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    test_size = load_train_config(untrained, list(opts.overrides)).model.test_size
    if test_size is None:
        raise InputError(f"{untrained}: model.test_size is not set; the baselines are built at "
                         "the recipes' test size")
    say(f"[zoo] baselines (test size {list(test_size)})")
    models: list[ZooModel] = [pretrained_gem(gem_cfg, test_size, runs)]
    models.append(ensure_run(untrained, [*opts.overrides, "trainer.max_steps=0"], runs, cache,
                             suffix="_untrained", training="untrained head",
                             retrain=opts.retrain, say=say))
    for i, recipe in enumerate(recipes, 1):
        say(f"[zoo] training {i}/{len(recipes)}: {recipe.name}")
        models.append(ensure_run(recipe, opts.overrides, runs, cache, retrain=opts.retrain,
                                 say=say))
    store, shared = None, frozenset()
    if opts.feature_cache:
        from vpr_ros.eval.backbone_cache import HeldOutFeatures
        from vpr_ros.eval.tasks import eval_image_sets

        db, q = eval_image_sets(f"nordland:{opts.database_season}",
                                f"nordland:{opts.query_season}", opts.subset)
        store = HeldOutFeatures(cache, [db.paths, q.paths], opts.batch_size, opts.progress)
        shared = shared_backbones(models, store, opts.device)
    rows = []
    for i, m in enumerate(models, 1):
        say(f"[zoo] evaluating {i}/{len(models)}: {m.name}")
        rows.extend(evaluate_model(m, opts, say, store, shared))
    doc = {"rows": rows, "split": {"database": f"nordland:{opts.database_season}",
                                   "queries": f"nordland:{opts.query_season}",
                                   "subset": opts.subset, "tolerance": opts.tolerance},
           "recipes": [str(r) for r in recipes], "overrides": list(opts.overrides),
           "runs_dir": str(runs), "wall_s": round(time.time() - t0, 1),
           "heldout_feature_cache": [] if store is None else
           [{"digest": d, **e} for d, e in sorted(store.entries.items())]}
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, opts.ks)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "table.md").write_text(table)
    doc["table"] = table
    return doc


def _gem_config() -> Path:
    from vpr_ros.resources import config_file

    return config_file("models", "gem_effnetlite0.yaml")


def shared_backbones(models: Sequence[ZooModel], store: "HeldOutFeatures", device: str
                     ) -> frozenset[str]:
    """Digests of the backbone keys whose held-out features are worth caching: keys of two or
    more models (the recipes' shared frozen backbone), or already on disk from an earlier run.
    A model alone on its backbone (say, fine-tuned) is encoded in full, as caching would only
    add a disk write."""
    from collections import Counter

    from vpr_ros.eval.backbone_cache import backbone_key, key_digest
    from vpr_ros.eval.tasks import open_encoder

    counts: Counter[str] = Counter()
    on_disk: set[str] = set()
    for m in models:
        key = backbone_key(open_encoder(m.model_dir, "torch", device), store.sets)
        counts[key_digest(key)] += 1
        if store.has(key):
            on_disk.add(key_digest(key))
    return frozenset(d for d, n in counts.items() if n > 1 or d in on_disk)


def evaluate_model(m: ZooModel, opts: ZooOptions, say: Callable[[str], None],
                   store: "Optional[HeldOutFeatures]" = None,
                   shared: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Encode the held-out split once, then one row per search variant (the JSON of
    ``vpr eval recall`` with the matching options is under ``eval``).

    When the model's backbone key is in ``shared``, "encoding" is the model's head on the
    cached backbone features in ``store`` (same arrays as full encoding)."""
    from vpr_ros.eval.backbone_cache import backbone_key, key_digest
    from vpr_ros.eval.tasks import encode_eval, open_encoder, recall_from_encoded

    encoder = open_encoder(m.model_dir, "torch", opts.device)
    plans = variants(encoder.output_names, opts.rerank_top)
    extras = sorted({e for _, p in plans for e in p.extras})
    key = backbone_key(encoder, store.sets) if store is not None else None
    digest = key_digest(key) if key is not None else None
    cached = store is not None and digest in shared
    encode_fn = store.encode_fn(encoder, key, extras) if cached else None
    ev = encode_eval(m.model_dir, f"nordland:{opts.database_season}",
                     f"nordland:{opts.query_season}", tolerance=opts.tolerance,
                     subset=opts.subset, extras=extras, batch_size=opts.batch_size,
                     device=opts.device, progress=opts.progress, encoder=encoder,
                     encode_fn=encode_fn)
    if cached:
        entry = store.entries[digest]
        how = "from disk" if entry["reused"] else "computed this run"
        say(f"    head on cached backbone features ({how}: {Path(entry['file']).name}), "
            f"{ev.timings['encode']} s")
    else:
        say(f"    full encoding, {ev.timings['encode']} s")
    method = method_name(m.model_dir, m.training)
    rows = []
    for variant, plan in plans:
        res = recall_from_encoded(ev, plan, opts.ks, progress=opts.progress)
        r = res["recall"]
        say(f"    {variant:<28} " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in r.items())
            + f"   {res['search']['descriptor_bytes']['total']} B")
        rows.append({"method": method, "variant": variant, "run": m.name,
                     "model_dir": str(m.model_dir), "training": m.training,
                     "recipe": m.recipe, "steps": m.steps, "train_wall_s": m.train_wall_s,
                     "reused_run": m.reused, "recall": r,
                     "backbone_features": "cached" if cached else "encoded",
                     "feature_cache": digest if cached else None,
                     "descriptor_bytes": res["search"]["descriptor_bytes"],
                     "fingerprint": res["model"]["fingerprint"], "eval": res})
    return rows


def _bytes_cell(b: dict[str, int]) -> str:
    parts = [f"{b[k]} {label}" for k, label in (("binary", "code"), ("global", "float"),
                                                  ("local", "local")) if k in b]
    return str(b["total"]) if len(parts) == 1 else f"{b['total']} ({' + '.join(parts)})"


def markdown_table(rows: Sequence[dict[str, Any]], ks: Sequence[int]) -> str:
    """The README table: method, variant, R@K, bytes per image as stored, steps, wall time."""
    head = ["method", "variant", *(f"R@{k}" for k in ks), "bytes / image", "trained steps",
            "training wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        wall = row["train_wall_s"]
        cells = [row["method"], row["variant"],
                 *(f"{100 * row['recall'][f'R@{k}']:.1f}" for k in ks),
                 _bytes_cell(row["descriptor_bytes"]), str(row["steps"]),
                 "—" if wall is None else f"{wall / 60:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
