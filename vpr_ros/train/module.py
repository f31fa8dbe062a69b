"""The Lightning module: one optimisation step over every training dataset at once.

Multi-dataset joint training follows QAA (arplaboratory/QAA ``vpr_model.py``): each step takes
one P x K batch from every dataset's loader (Lightning's ``CombinedLoader``, "max_size_cycle":
smaller datasets cycle), runs the model once over all images, and sums the losses computed *per
dataset*, so places of different datasets are never compared with each other (their labels
mean nothing across datasets) and each dataset contributes its own hard pairs.

With a frozen backbone whose features were cached, a batch holds backbone features instead of
images and only the aggregator runs; the module (and its checkpoints) still holds the whole
:class:`~vpr_ros.models.vpr_model.VPRModel`, so the saved result is an ordinary model.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from vpr_ros.errors import ConfigError
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.vpr_model import VPRModel
from vpr_ros.train.config import TrainConfig
from vpr_ros.train.losses import PlaceLoss


def lr_factor(step: int, warmup: int, milestones: tuple[int, ...], gamma: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then x gamma at each milestone passed."""
    if warmup > 0 and step < warmup:
        return float(step + 1) / float(warmup)
    return float(gamma ** sum(1 for m in milestones if step >= m))


class VPRTrainingModule(L.LightningModule):
    def __init__(self, model: VPRModel, cfg: TrainConfig, cached: bool,
                 steps_per_epoch: int) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.cached = cached
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.criterion = PlaceLoss(cfg.loss, model.aggregator)
        self.weights = {d.name: d.loss_weight for d in cfg.data.train}
        self.loss_history: list[float] = []

    # -- forward -----------------------------------------------------------------------------
    def outputs(self, x: torch.Tensor, cls_token: Optional[torch.Tensor] = None
                ) -> dict[str, torch.Tensor]:
        """Named outputs ({"global": ..., **extras}) of images, or of cached features."""
        if not self.cached:
            return self.model.forward_all(x)
        feats = BackboneOutput(features=x, cls_token=cls_token)
        agg = self.model.aggregator
        if self.model.extra_outputs:
            return agg.forward_all(feats)
        return {"global": agg(feats)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        names = list(batch)
        inputs, tokens, labels = [], [], []
        for name in names:
            item = batch[name]
            if len(item) == 3:
                x, tok, y = item
                tokens.append(tok)
            else:
                x, y = item
            inputs.append(x)
            labels.append(y)
        sizes = [len(x) for x in inputs]
        same_shape = len({tuple(x.shape[1:]) for x in inputs}) == 1
        if same_shape:  # one forward pass over every dataset's images (as QAA does)
            out_all = self.outputs(torch.cat(inputs), torch.cat(tokens) if tokens else None)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            outs = [{k: v[s:s + n] for k, v in out_all.items()} for s, n in zip(starts, sizes)]
        else:
            outs = [self.outputs(x, tokens[i] if tokens else None) for i, x in enumerate(inputs)]
        if any(torch.isnan(o["global"]).any() for o in outs):
            raise FloatingPointError("NaN descriptors in training; lower the learning rate or "
                                     "use precision 32-true / bf16-mixed")
        total = torch.zeros((), device=inputs[0].device)
        for name, out, y in zip(names, outs, labels):
            loss, stats = self.criterion(out, y)
            total = total + self.weights[name] * loss
            self.log(f"loss/{name}", stats["base"], on_step=True, batch_size=len(y))
            if "mined_fraction" in stats:
                self.log(f"mined_fraction/{name}", stats["mined_fraction"], on_step=True,
                         batch_size=len(y))
            for key, value in stats.items():
                if key not in ("base", "ms", "triplet", "mined_fraction"):
                    self.log(f"{key}/{name}", value, on_step=True, batch_size=len(y))
        self.log("loss", total, prog_bar=True, on_step=True, batch_size=sum(sizes))
        self.loss_history.append(float(total.detach()))
        return total

    # -- optimisation ------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        seen = {id(p) for p in backbone}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        opt = self.cfg.optimizer
        groups: list[dict[str, Any]] = []
        if head:
            groups.append({"params": head, "lr": opt.lr, "name": "head"})
        if backbone and not self.cached:
            blr = opt.lr if opt.backbone_lr is None else opt.backbone_lr
            groups.append({"params": backbone, "lr": blr, "name": "backbone"})
        if not groups:
            raise ConfigError(f"{self.cfg.source}: nothing to train: every parameter of the "
                              "model is frozen; unfreeze backbone stages/blocks or use an "
                              "aggregator with parameters")
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = self.cfg.optimizer
        groups = self.param_groups()
        if opt_cfg.name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=opt_cfg.lr, momentum=opt_cfg.momentum,
                weight_decay=opt_cfg.weight_decay)
        elif opt_cfg.name == "adam":
            optimizer = torch.optim.Adam(groups, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=opt_cfg.lr,
                                          weight_decay=opt_cfg.weight_decay)
        sch = self.cfg.scheduler
        scale = self.steps_per_epoch if sch.unit == "epoch" else 1
        warmup = sch.warmup * scale
        milestones = tuple(m * scale for m in sch.milestones)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup, milestones, sch.gamma))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if opt is None:
            return
        for group in opt.param_groups:
            self.log(f"lr/{group.get('name', 'group')}", group["lr"], on_step=True)


def steps_per_epoch(batches_per_epoch: int, accumulate: int) -> int:
    return max(1, math.ceil(batches_per_epoch / max(1, accumulate)))


def trainable_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
