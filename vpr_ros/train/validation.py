"""Retrieval validation during training: Recall@1/5/10 on a held-out set, at the test size.

A training loss that goes down says the model fits its batches; whether it recognises places
it has never seen is what Recall@K on a separate set says. This callback computes it every
``every_n_steps`` optimizer steps, every ``every_n_epochs`` epochs and at the end, on rank 0,
with the same ground-truth rules and map search as ``vpr eval recall``. With a cached (frozen)
backbone, the validation images' backbone features are computed once, so validating costs one
aggregator pass.

The set may have several parts (MSLS-val's two cities): all queries search the pooled
database, positives come from the query's own part, and the recall of every part is reported
beside the pooled one.

What the figures are used for: the model with the best ``metric`` so far is written to
``<output>/model_best`` (beside ``<output>/model``, the last one), and with ``early_stopping``
training stops once the metric has not improved by more than ``min_delta`` for ``patience``
validations in a row (CQVPR's rule: R@5, three epochs). The best value and the count of
validations without improvement are saved in Lightning checkpoints, so a resumed run keeps
selecting and stopping as an uninterrupted one would.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch

from vpr_ros.datasets.image_sets import read_image_set
from vpr_ros.datasets.images import read_rgb
from vpr_ros.eval.ground_truth import ground_truth_for
from vpr_ros.eval.recall import evaluate_descriptors, recall_at_k
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.train.config import TrainConfig, ValConfig
from vpr_ros.train.data import ImageTransform, load_or_compute_features, state_hash

log = logging.getLogger(__name__)


class RetrievalValidation(L.Callback):
    def __init__(self, vcfg: ValConfig, cfg: TrainConfig, cached: bool,
                 test_size: tuple[int, int], cache_dir: Path, progress: bool,
                 output: Optional[Path] = None) -> None:
        self.vcfg = vcfg
        self.cfg = cfg
        self.cached = cached
        self.test_size = test_size
        self.cache_dir = cache_dir
        self.progress = progress
        self.output = output
        db_paths: list[Path] = []
        q_paths: list[Path] = []
        positives: list[np.ndarray] = []
        self.part_names: list[str] = []
        self.part_queries: list[slice] = []
        labels = set()
        for db_spec, q_spec in vcfg.parts():
            db, q = read_image_set(db_spec), read_image_set(q_spec)
            if vcfg.subset is not None:
                db, q = db.select(*vcfg.subset), q.select(*vcfg.subset)
            pos, label = ground_truth_for(db, q, vcfg.threshold_m, vcfg.tolerance)
            positives += [p + len(db_paths) for p in pos]
            self.part_queries.append(slice(len(q_paths), len(q_paths) + len(q)))
            self.part_names.append(_part_name(Path(str(q.source))))
            db_paths += db.paths
            q_paths += q.paths
            labels.add(label)
        self.db_paths, self.q_paths = db_paths, q_paths
        self.positives = positives
        self.gt_label = "; ".join(sorted(labels)) + (
            f", {len(self.part_names)} parts, pooled database" if len(self.part_names) > 1 else "")
        early = vcfg.early_stopping
        self.metric = vcfg.metric
        self.stop_metric = (early.metric or vcfg.metric) if early is not None else None
        self.results: Optional[dict[str, Any]] = None
        self.history: list[dict[str, Any]] = []
        self.best: Optional[dict[str, Any]] = None        # {"step", "value"} of metric
        self.stop_best = -np.inf                          # early stopping's reference
        self.bad_validations = 0
        self.stopped_at: Optional[int] = None
        self._last_step = -1
        self._features: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    @torch.no_grad()
    def _descriptors(self, module: Any) -> np.ndarray:
        model = module.model
        device = module.device
        transform = ImageTransform(model.config.input, self.test_size, None)
        paths = self.db_paths + self.q_paths
        out = []
        bs = self.cfg.feature_cache.batch_size
        if self.cached:
            if self._features is None:
                self._features = load_or_compute_features(
                    # the backbone's weights are in the key: another recipe's backbone (or a
                    # fine-tuned one) sharing this cache dir must never reuse these features
                    self.cache_dir, ["val", state_hash(model.backbone),
                                     repr(model.config.backbone), str(self.test_size),
                                     repr(model.config.input), *map(str, paths)],
                    backbone=model.backbone, paths=paths, transform=transform, variants=1,
                    seed=0, batch_size=bs, device=device, desc="caching validation features",
                    progress=self.progress)
            feats, tokens = self._features
            for s in range(0, len(paths), bs):
                x = feats[s:s + bs, 0].float().to(device)
                tok = None if tokens is None else tokens[s:s + bs, 0].float().to(device)
                out.append(model.aggregator(BackboneOutput(x, tok)).float().cpu())
        else:
            for s in range(0, len(paths), bs):
                x = torch.stack([transform(read_rgb(p), augment=False) for p in paths[s:s + bs]])
                out.append(model(x.to(device)).float().cpu())
        return torch.cat(out).numpy()

    def run(self, trainer: L.Trainer, module: Any) -> None:
        """Validate (rank 0), keep the best model, and stop every rank when early stopping
        says so."""
        step = int(trainer.global_step)
        if step == self._last_step:
            return
        self._last_step = step
        stop = False
        if trainer.is_global_zero:
            stop = self._validate(trainer, module, step)
        if self.stop_metric is not None:
            stop = bool(trainer.strategy.broadcast(stop, src=0))
            if stop:
                trainer.should_stop = True

    def _validate(self, trainer: L.Trainer, module: Any, step: int) -> bool:
        """One validation; returns whether early stopping asks to stop."""
        model = module.model
        was_training = model.training
        model.eval()
        try:
            desc = self._descriptors(module)
            n_db = len(self.db_paths)
            res = evaluate_descriptors(desc[:n_db], desc[n_db:], self.positives, "training",
                                       ks=(1, 5, 10), ground_truth=self.gt_label)
            metrics = {f"val/{self.vcfg.name}/R@{k}": v for k, v in res.recalls.items()}
            parts = {}
            if len(self.part_names) > 1:
                for name, rows in zip(self.part_names, self.part_queries):
                    recalls, _ = recall_at_k(res.ranked_ids[rows], self.positives[rows],
                                             (1, 5, 10))
                    parts[name] = {f"R@{k}": round(v, 6) for k, v in recalls.items()}
                    metrics.update({f"val/{self.vcfg.name}/{name}/R@{k}": v
                                    for k, v in recalls.items()})
            if trainer.logger is not None:
                trainer.logger.log_metrics(metrics, step=step)
            self.results = {"step": step, **res.to_dict(), **({"parts": parts} if parts else {})}
            entry = {"step": step, "epoch": int(trainer.current_epoch),
                     **{f"R@{k}": v for k, v in res.recalls.items()}}
            self.history.append(entry)
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            value = metric_value(entry, self.metric)
            if self.vcfg.keep_best and (self.best is None or value > self.best["value"]):
                self.best = {"step": step, "epoch": entry["epoch"], "metric": self.metric,
                             "value": value}
                self._save_best(model, step, value)
        finally:
            model.train(was_training)
        if self.stop_metric is None:
            return False
        watched = metric_value(entry, self.stop_metric)
        if watched > self.stop_best + self.vcfg.early_stopping.min_delta:
            self.stop_best, self.bad_validations = watched, 0
            return False
        self.bad_validations += 1
        if self.bad_validations >= self.vcfg.early_stopping.patience:
            self.stopped_at = step
            log.info("early stopping at step %d: %s has not improved on %.4f for %d "
                     "validations", step, self.stop_metric, self.stop_best, self.bad_validations)
            return True
        return False

    def _save_best(self, model: Any, step: int, value: float) -> None:
        if self.output is None:
            return
        from vpr_ros.models.model_dir import save_model_dir

        save_model_dir(model, self.output / "model_best", extra={
            "trained_with": str(self.cfg.source), "steps": step, "train_name": self.cfg.name,
            "selected_by": f"validation {self.vcfg.name} {self.metric} = {value:.6f}"})

    # -- when ----------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = self.vcfg.every_n_steps
        if every and trainer.global_step > 0 and trainer.global_step % every == 0:
            self.run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        every = self.vcfg.every_n_epochs
        if every and (trainer.current_epoch + 1) % every == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.stopped_at is None:
            self.run(trainer, pl_module)
        if self.results is not None:
            self.results["history"] = self.history
            self.results["best"] = self.best
            self.results["metric"] = self.metric
            if self.stop_metric is not None:
                self.results["early_stopping"] = {
                    "metric": self.stop_metric, "best": self.stop_best,
                    "patience": self.vcfg.early_stopping.patience,
                    "stopped_at_step": self.stopped_at}

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stop_best": float(self.stop_best),
                "bad_validations": self.bad_validations, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.stop_best = float(state.get("stop_best", -np.inf))
        self.bad_validations = int(state.get("bad_validations", 0))
        self.history = list(state.get("history", []))


def metric_value(recalls: dict[str, Any], metric: str) -> float:
    """``R@K`` from a validation entry, or a sum such as ``R@1+R@5`` (SelaVPR++ selects by
    it)."""
    return float(sum(recalls[m] for m in metric.split("+")))


def _part_name(query_folder: Path) -> str:
    """A part's label: the MSLS city (``<city>/query``) or the query folder's name."""
    if query_folder.name in ("query", "queries") and query_folder.parent.name:
        return query_folder.parent.name
    return query_folder.name or str(query_folder)
