"""The models of ``vpr eval zoo``: trained recipes (reused when already finished) and baselines.

Why a record beside each run: the comparison is only fair if every row was trained from the
recipe and overrides the table claims. ``<run>/zoo_run.json`` records the recipe file (path and
content hash) and the ``--set`` overrides; a run is reused only when that record matches and the
run finished (model directory + ``train_summary.json``), and a folder holding anything else is
refused rather than silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vpr_ros.errors import InputError

RECORD = "zoo_run.json"


@dataclass
class ZooModel:
    """One model of the table and how it came to be."""

    name: str              # run folder name (recipe name, or a baseline's)
    model_dir: Path
    training: str          # "trained" | "untrained head" | "none (pretrained backbone)"
    recipe: Optional[str]
    steps: int
    train_wall_s: Optional[float]
    reused: bool


def _record(recipe: Path, overrides: Sequence[str]) -> dict[str, Any]:
    return {"recipe": str(recipe.resolve()),
            "recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest(),
            "overrides": list(overrides)}


def _finished(run: Path) -> bool:
    return (run / "model" / "model.json").is_file() and (run / "train_summary.json").is_file()


def ensure_run(recipe: Path, overrides: Sequence[str], runs_dir: Path, cache_dir: Path, *,
               suffix: str = "", training: str = "trained", retrain: bool = False,
               say: Callable[[str], None] = print) -> ZooModel:
    """Train ``recipe`` (with ``overrides``) into ``runs_dir/<recipe name><suffix>`` through the
    same code as ``vpr train``, unless a finished run of the same recipe and overrides is there.

    All runs share ``cache_dir`` (``feature_cache.dir``), so a frozen backbone encodes each
    training view once for the whole zoo. A user's own ``feature_cache.dir`` override wins.
    """
    from vpr_ros.train.config import load_train_config
    from vpr_ros.train.run import train

    recipe = Path(recipe)
    if not recipe.is_file():
        raise InputError(f"recipe {recipe}: no such file (the defaults are "
                         "config/train/*_effnetlite0_nordland.yaml)")
    cfg = load_train_config(recipe, [f"feature_cache.dir={cache_dir}", *overrides])
    run = runs_dir / f"{cfg.name}{suffix}"
    want = _record(recipe, overrides)
    have = _read_record(run)
    if have == want and _finished(run):
        summary = json.loads((run / "train_summary.json").read_text())
        say(f"  {run.name}: reusing the finished run ({summary.get('steps', 0)} steps)")
        return _model(run, summary, training, want["recipe"], reused=True)
    resume: Optional[str] = "auto"
    if have is not None and have != want or have is None and run.exists() and any(run.iterdir()):
        if not retrain:
            raise InputError(
                f"{run}: holds a run of another recipe or other overrides (recorded "
                f"{have or 'nothing'}; asked {want}); pass --retrain to train it again there, "
                "or choose another --runs-dir")
        say(f"  {run.name}: retraining (the folder held another recipe or overrides)")
        resume = None
        (run / "train_summary.json").unlink(missing_ok=True)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    run.mkdir(parents=True, exist_ok=True)
    (run / RECORD).write_text(json.dumps(want, indent=2) + "\n")
    say(f"  {run.name}: training ({cfg.trainer.max_steps} steps) -> {run}")
    train(cfg, resume=resume, output=run)
    summary = json.loads((run / "train_summary.json").read_text())
    return _model(run, summary, training, want["recipe"], reused=False)


def _read_record(run: Path) -> Optional[dict[str, Any]]:
    path = run / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"unreadable": str(path)}


def _model(run: Path, summary: dict[str, Any], training: str, recipe: str, reused: bool
           ) -> ZooModel:
    wall = (summary.get("timings_s") or {}).get("total_s")
    return ZooModel(name=run.name, model_dir=run / "model", training=training, recipe=recipe,
                    steps=int(summary.get("steps", 0)), train_wall_s=wall, reused=reused)


def pretrained_gem(config: Path, test_size: Sequence[int], runs_dir: Path) -> ZooModel:
    """GeM (p as in ``config``, 3 for the default) on the pretrained backbone at the recipes'
    test size. Nothing is trained; the model directory is reused while its config matches (so
    its fingerprint stays the same across calls)."""
    from vpr_ros.models.config import load_yaml, model_config_from_dict
    from vpr_ros.models.model_dir import init_model, read_model_meta, save_model_dir

    data = load_yaml(config)
    weights = dict(data.get("weights") or {})
    sized = model_config_from_dict(data, source=str(config)).with_input_size(tuple(test_size))
    out = runs_dir / f"{sized.name}_pretrained"
    reused = (out / "model" / "model.json").is_file() and \
        read_model_meta(out / "model").config.to_dict() == sized.to_dict()
    if not reused:
        model = init_model(sized, weights)
        model.eval()
        save_model_dir(model, out / "model", extra={"baseline": "pretrained backbone + GeM, "
                                                    "not trained", "config": str(config)})
    return ZooModel(name=out.name, model_dir=out / "model",
                    training="none (pretrained backbone)", recipe=str(config), steps=0,
                    train_wall_s=None, reused=reused)
