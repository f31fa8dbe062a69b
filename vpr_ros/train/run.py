"""``vpr train``: recipe -> Lightning run -> model directory.

The result of training is a model directory written by :func:`save_model_dir` (``model.json``
recording the *test* input size, ``model.safetensors`` with the whole model), so the node, the
exporter and the evaluator load it unchanged. Lightning provides the loop, mixed precision,
gradient accumulation, checkpoint/resume, TensorBoard logs, the progress bar and the multi-GPU /
multi-node launchers (``trainer.devices``, ``num_nodes``, ``strategy``: run the same command
under ``torchrun``/SLURM for several nodes).

Output folder layout::

    <output>/model/               the trained model directory (loadable by every tool)
    <output>/model_best/          with validation: the model of the best validation recall
    <output>/checkpoints/         Lightning checkpoints (last.ckpt: resume with --resume auto)
    <output>/tensorboard/         TensorBoard event files
    <output>/cache/               cached backbone features (frozen backbones only)
    <output>/train_summary.json   losses, timings, validation figures
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch

from vpr_ros.errors import CheckpointError, ConfigError
from vpr_ros.models.config import load_yaml, model_config_from_dict
from vpr_ros.models.model_dir import init_model, load_model_dir, save_model_dir
from vpr_ros.models.vpr_model import VPRModel
from vpr_ros.train.config import TrainConfig
from vpr_ros.train.data import (CachedFeatureDataset, ImageTransform, PlaceImageDataset, TrainSet,
                                load_or_compute_features, make_randaugment, read_place_set,
                                state_hash)
from vpr_ros.train.module import VPRTrainingModule, steps_per_epoch
from vpr_ros.train.validation import RetrievalValidation

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output: Path
    model_dir: Path
    fingerprint: str
    steps: int
    losses: list[float]
    wall_s: float
    timings: dict[str, float] = field(default_factory=dict)
    validation: Optional[dict[str, Any]] = None
    best_model_dir: Optional[Path] = None  # <output>/model_best when validation selected one
    global_rank: int = 0  # under DDP every process returns; only rank 0 wrote the outputs


# -- model ------------------------------------------------------------------------------------

def build_training_model(cfg: TrainConfig) -> tuple[VPRModel, tuple[int, int], tuple[int, int]]:
    """The model to train (weights loaded), with its config already at the test size."""
    m = cfg.model
    if m.init is not None:
        model, meta = load_model_dir(cfg.resolve(m.init))
        config = meta.config
        if m.backbone_weights is not None:
            raise ConfigError(f"{cfg.source}: model.backbone_weights cannot be combined with "
                              "model.init (the model directory already holds its weights)")
    else:
        if isinstance(m.config, str):
            config_path = cfg.resolve(m.config)
            data = load_yaml(config_path)
            where = str(config_path)
        elif isinstance(m.config, dict):
            data, where, config_path = dict(m.config), f"{cfg.source}: model.config", cfg.source
        else:
            raise ConfigError(f"{cfg.source}: model.config must be a model YAML path or a "
                              "mapping in the model-config format")
        weights = dict(data.get("weights") or {})
        if m.backbone_weights is not None:
            weights["backbone"] = m.backbone_weights
        bad = sorted(set(weights) - {"backbone"})
        if bad:
            raise ConfigError(f"{where}: weights: unknown key(s) {bad}; only 'backbone'")
        src = weights.get("backbone")
        if isinstance(src, str) and src not in ("package", "none", "random"):
            p = Path(src).expanduser()
            if not p.is_absolute():
                near = Path(config_path).parent / p
                p = near if near.exists() else cfg.resolve(p)
            weights["backbone"] = str(p)
        elif src in (None, "none", "random"):
            log.warning("%s: the backbone starts from random weights (weights.backbone: %s); "
                        "set model.backbone_weights to train from pre-trained weights",
                        cfg.source, src)
        config = model_config_from_dict(data, source=where)
        torch.manual_seed(m.seed)
        model = init_model(config, weights)
    test_size = tuple(m.test_size or config.input.size)
    train_size = tuple(m.train_size or test_size)
    for size in (train_size, test_size):
        model.backbone.check_input_size(size)
    model.config = config.with_input_size(test_size)  # what model.json will record
    return model, train_size, test_size


_state_hash = state_hash  # the training cache key (shared with vpr eval zoo's)


def use_feature_cache(cfg: TrainConfig, model: VPRModel) -> bool:
    trainable = any(p.requires_grad for p in model.backbone.parameters())
    setting = cfg.feature_cache.enabled
    if setting is True and trainable:
        raise ConfigError(f"{cfg.source}: feature_cache.enabled is true but the backbone has "
                          "trainable parameters; cached features would go stale. Freeze the "
                          "backbone or set feature_cache.enabled: auto")
    return (not trainable) if setting == "auto" else bool(setting)


def _device(cfg: TrainConfig) -> torch.device:
    acc = cfg.trainer.accelerator
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _check_precision(cfg: TrainConfig) -> None:
    if _device(cfg).type == "cpu" and cfg.trainer.precision in ("16-mixed", "16-true"):
        raise ConfigError(f"{cfg.source}: trainer.precision {cfg.trainer.precision!r} needs a "
                          "CUDA GPU; on CPU use bf16-mixed or 32-true (e.g. --set "
                          "trainer.precision=32-true)")


# -- data -------------------------------------------------------------------------------------

class _DataModule(L.LightningDataModule):
    """Builds the per-dataset loaders once the trainer knows this process's rank."""

    def __init__(self, sets: list[TrainSet], cfg: TrainConfig) -> None:
        super().__init__()
        self.sets = sets
        self.cfg = cfg

    def train_dataloader(self) -> Any:
        """One loader per dataset, combined so that every step draws one batch from each;
        "max_size_cycle": the epoch is the longest loader's, shorter ones start over."""
        from lightning.pytorch.utilities import CombinedLoader

        t = self.cfg.trainer
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        loaders = {s.cfg.name: s.loader(t.seed + i, rank, world, t.num_workers,
                                        t.batches_per_epoch) for i, s in enumerate(self.sets)}
        return CombinedLoader(loaders, mode="max_size_cycle")


def build_train_sets(cfg: TrainConfig, model: VPRModel, train_size: tuple[int, int],
                     cached: bool, cache_dir: Path, progress: bool) -> list[TrainSet]:
    augment = make_randaugment(cfg.augment)
    transform = ImageTransform(model.config.input, train_size, augment)
    sets = []
    backbone_hash = _state_hash(model.backbone) if cached else ""
    for d in cfg.data.train:
        ps = read_place_set(d, cfg)
        if cached:
            variants = cfg.feature_cache.variants if augment is not None else 1
            key = [backbone_hash, str(train_size), repr(model.config.input),
                   repr(cfg.augment), str(variants), str(cfg.trainer.seed),
                   hashlib.sha256("\n".join(map(str, ps.paths)).encode()).hexdigest()]
            feats, tokens = load_or_compute_features(
                cache_dir, key, backbone=model.backbone, paths=ps.paths, transform=transform,
                variants=variants, seed=cfg.trainer.seed,
                batch_size=cfg.feature_cache.batch_size, device=_device(cfg),
                desc=f"caching {d.name} features", progress=progress)
            model.backbone.to("cpu")
            dataset: Any = CachedFeatureDataset(feats, ps.labels, tokens)
        else:
            dataset = PlaceImageDataset(ps, transform)
        sets.append(TrainSet(d, ps, dataset))
    return sets


def _epoch_batches(sets: list[TrainSet], cfg: TrainConfig, world_size: int) -> int:
    if cfg.trainer.batches_per_epoch is not None:
        return cfg.trainer.batches_per_epoch
    return max(s.places.num_places // s.cfg.places_per_batch // world_size for s in sets)


# -- the run ----------------------------------------------------------------------------------

class _FinalModel(L.Callback):
    """Writes the model directory when training ends (rank 0 only), before the trainer
    tears down, so the model is saved even when a later step (summary, checkpoint) fails."""

    def __init__(self, out: Path, cfg: TrainConfig) -> None:
        self.out = out
        self.cfg = cfg
        self.fingerprint = ""

    def on_train_end(self, trainer: L.Trainer, pl_module: VPRTrainingModule) -> None:
        if not trainer.is_global_zero:
            return
        model = pl_module.model
        was_training = model.training
        model.eval()
        self.fingerprint = save_model_dir(model, self.out / "model", extra={
            "trained_with": str(self.cfg.source), "steps": int(trainer.global_step),
            "train_name": self.cfg.name})
        model.train(was_training)


def resolve_resume(out: Path, resume: Optional[str]) -> Optional[str]:
    if resume is None:
        return None
    if resume == "auto":
        last = out / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        log.info("--resume auto: no %s yet; starting from scratch", last)
        return None
    if not Path(resume).is_file():
        raise ConfigError(f"--resume {resume}: no such checkpoint file (use 'auto' for "
                          f"{out / 'checkpoints' / 'last.ckpt'})")
    check_resume_checkpoint(Path(resume))
    return resume


def check_resume_checkpoint(path: Path) -> None:
    """Refuse a resume checkpoint that is not plain data before Lightning sees it.

    Why: Lightning loads ``ckpt_path`` with ``torch.load``; left to itself (``weights_only``
    unset) that unpickles anything, and a pickle can run code. The checkpoints this trainer
    writes hold tensors, numbers, strings and containers only, so they load with
    ``weights_only=True``; whatever does not is refused here (and ``fit`` gets
    ``weights_only=True`` too). Memory-mapped, so the check reads little of a large file.
    """
    from vpr_ros.models.checkpoints import safe_torch_load

    try:
        ckpt = safe_torch_load(path, what="training checkpoint", mmap=True,
                               advice="resume from a .ckpt this trainer wrote")
    except CheckpointError as exc:
        raise CheckpointError(f"--resume {exc}") from None
    keys = ("state_dict", "global_step")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        raise CheckpointError(f"--resume {path}: not a training checkpoint (no "
                              f"{' / '.join(keys)}); resume from a .ckpt this trainer wrote "
                              "(e.g. --resume auto)")


def train(cfg: TrainConfig, resume: Optional[str] = None, output: Optional[Path] = None
          ) -> TrainResult:
    """Run a training recipe; returns where the model directory is and how training went."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    t0, cpu0 = time.time(), time.process_time()
    out = Path(output or cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_resume(out, resume)  # a refused checkpoint stops before any work
    tc = cfg.trainer
    if tc.threads:
        torch.set_num_threads(tc.threads)
    _check_precision(cfg)
    L.seed_everything(tc.seed, workers=True, verbose=False)
    model, train_size, test_size = build_training_model(cfg)
    if tc.max_steps == 0:
        return _initial_model(cfg, model, out, t0, cpu0)
    cached = use_feature_cache(cfg, model)

    timings: dict[str, float] = {}
    final = _FinalModel(out, cfg)
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=out / "checkpoints", filename="step{step}",
                        every_n_train_steps=tc.checkpoint_every_n_steps, save_last=True,
                        save_top_k=1, auto_insert_metric_name=False),
        final,
    ]
    validation = None
    if cfg.data.val is not None:
        validation = RetrievalValidation(cfg.data.val, cfg, cached, test_size,
                                         cache_dir=Path(cfg.feature_cache.dir or out / "cache"),
                                         progress=tc.progress_bar, output=out)
        callbacks.insert(0, validation)
    trainer = L.Trainer(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
        strategy=tc.strategy, precision=tc.precision, max_steps=tc.max_steps,
        max_epochs=tc.max_epochs if tc.max_epochs is not None else (-1 if tc.max_steps > 0
                                                                    else None),
        accumulate_grad_batches=tc.accumulate_grad_batches,
        gradient_clip_val=tc.gradient_clip_val, log_every_n_steps=tc.log_every_n_steps,
        logger=TensorBoardLogger(save_dir=str(out), name="tensorboard", version=0),
        callbacks=callbacks, enable_progress_bar=tc.progress_bar, enable_model_summary=False,
        use_distributed_sampler=False, deterministic=tc.deterministic,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out))

    t_data = time.time()
    sets = build_train_sets(cfg, model, train_size, cached,
                            Path(cfg.feature_cache.dir or out / "cache"), tc.progress_bar)
    timings["data_s"] = round(time.time() - t_data, 2)
    batches = _epoch_batches(sets, cfg, trainer.world_size)
    module = VPRTrainingModule(model, cfg, cached,
                               steps_per_epoch(batches, tc.accumulate_grad_batches))
    log.info("training %s: %d dataset(s), %s, %d trainable parameters, %s", cfg.name,
             len(sets), "cached backbone features" if cached else "images",
             sum(p.numel() for g in module.param_groups() for p in g["params"]),
             f"{tc.max_steps} steps" if tc.max_steps > 0 else f"{tc.max_epochs} epochs")
    t_fit = time.time()
    with warnings.catch_warnings():
        # Expected here, not problems: frozen backbone stages stay in eval mode (their
        # BatchNorm statistics are ImageNet's), and a resumed run reuses its checkpoint folder.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        trainer.fit(module, datamodule=_DataModule(sets, cfg), ckpt_path=ckpt_path,
                    weights_only=True)
    # weights_only=False: what to *save* (optimizer and loop state too, needed to resume).
    trainer.save_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=False)
    timings["fit_s"] = round(time.time() - t_fit, 2)
    timings["total_s"] = round(time.time() - t0, 2)
    # CPU seconds of this process (all threads): on a busy shared machine the wall time above
    # is mostly waiting; this says what the work itself costs.
    timings["cpu_s"] = round(time.process_time() - cpu0, 2)
    result = TrainResult(output=out, model_dir=out / "model", fingerprint=final.fingerprint,
                         steps=int(trainer.global_step), losses=list(module.loss_history),
                         wall_s=timings["total_s"], timings=timings,
                         validation=validation.results if validation else None,
                         best_model_dir=(out / "model_best" if validation is not None
                                         and validation.best is not None else None),
                         global_rank=int(trainer.global_rank))
    if trainer.is_global_zero:
        write_summary(result, cfg)
    return result


def _initial_model(cfg: TrainConfig, model: VPRModel, out: Path, t0: float, cpu0: float
                   ) -> TrainResult:
    """``max_steps: 0``: the model exactly as training would start it (same seed, weights and
    test size), saved as a model directory; the "untrained" baseline of an experiment."""
    model.eval()
    fp = save_model_dir(model, out / "model", extra={"trained_with": str(cfg.source),
                                                     "steps": 0, "train_name": cfg.name})
    timings = {"total_s": round(time.time() - t0, 2),
               "cpu_s": round(time.process_time() - cpu0, 2)}
    result = TrainResult(output=out, model_dir=out / "model", fingerprint=fp, steps=0, losses=[],
                         wall_s=timings["total_s"], timings=timings)
    write_summary(result, cfg)
    return result


def write_summary(result: TrainResult, cfg: TrainConfig) -> None:
    losses = np.asarray(result.losses, dtype=np.float64)
    head = float(losses[: max(1, len(losses) // 10)].mean()) if len(losses) else None
    tail = float(losses[-max(1, len(losses) // 10):].mean()) if len(losses) else None
    doc = {"config": str(cfg.source), "name": cfg.name, "model_dir": str(result.model_dir),
           "best_model_dir": str(result.best_model_dir) if result.best_model_dir else None,
           "fingerprint": result.fingerprint, "steps": result.steps,
           "loss_first_10pct": head, "loss_last_10pct": tail, "losses": result.losses,
           "timings_s": result.timings, "validation": result.validation}
    (result.output / "train_summary.json").write_text(json.dumps(doc, indent=2) + "\n")
