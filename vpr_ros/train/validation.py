"""Retrieval validation during training: Recall@1/5/10 on a held-out set, at the test size.

A training loss that goes down says the model fits its batches; whether it recognises places
it has never seen is what Recall@K on a separate set says. This callback computes it every
``every_n_steps`` optimizer steps and at the end, on rank 0, with the same ground-truth rules
and map search as ``vpr eval recall``. With a cached (frozen) backbone, the validation images'
backbone features are computed once, so validating costs one aggregator pass.
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
from vpr_ros.eval.recall import evaluate_descriptors
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.train.config import TrainConfig, ValConfig
from vpr_ros.train.data import ImageTransform, load_or_compute_features, state_hash

log = logging.getLogger(__name__)


class RetrievalValidation(L.Callback):
    def __init__(self, vcfg: ValConfig, cfg: TrainConfig, cached: bool,
                 test_size: tuple[int, int], cache_dir: Path, progress: bool) -> None:
        self.vcfg = vcfg
        self.cfg = cfg
        self.cached = cached
        self.test_size = test_size
        self.cache_dir = cache_dir
        self.progress = progress
        db, q = read_image_set(vcfg.database), read_image_set(vcfg.queries)
        if vcfg.subset is not None:
            db, q = db.select(*vcfg.subset), q.select(*vcfg.subset)
        self.db, self.q = db, q
        self.positives, self.gt_label = ground_truth_for(db, q, vcfg.threshold_m, vcfg.tolerance)
        self.results: Optional[dict[str, Any]] = None
        self.history: list[dict[str, Any]] = []
        self._last_step = -1
        self._features: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    @torch.no_grad()
    def _descriptors(self, module: Any) -> np.ndarray:
        model = module.model
        device = module.device
        transform = ImageTransform(model.config.input, self.test_size, None)
        paths = self.db.paths + self.q.paths
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
        step = int(trainer.global_step)
        if not trainer.is_global_zero or step == self._last_step:
            return
        self._last_step = step
        model = module.model
        was_training = model.training
        model.eval()
        try:
            desc = self._descriptors(module)
        finally:
            model.train(was_training)
        n_db = len(self.db)
        res = evaluate_descriptors(desc[:n_db], desc[n_db:], self.positives, "training",
                                   ks=(1, 5, 10), ground_truth=self.gt_label)
        metrics = {f"val/{self.vcfg.name}/R@{k}": v for k, v in res.recalls.items()}
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)
        self.results = {"step": step, **res.to_dict()}
        self.history.append({"step": step, **{f"R@{k}": v for k, v in res.recalls.items()}})
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = self.vcfg.every_n_steps
        if every and trainer.global_step > 0 and trainer.global_step % every == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.run(trainer, pl_module)
        if self.results is not None:
            self.results["history"] = self.history
