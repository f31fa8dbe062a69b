"""The training recipe (``config/train/*.yaml``), parsed and validated before anything runs.

Why strict: a misspelt key in a training YAML silently leaves a default in force and costs a
GPU-day before anyone notices. Every section is a dataclass; an unknown key, a wrong type or an
out-of-range value is a :class:`~vpr_ros.errors.ConfigError` that names the file, the key path
and the allowed keys or range. The model itself is described by the shared model config
(``config/models/*.yaml`` or inline, same schema), so the trainer, node, exporter and evaluator
build the same network.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence


from vpr_ros.errors import ConfigError
from vpr_ros.models.config import load_yaml
from vpr_ros.plain_data import parse_yaml

DATASET_KINDS = ("gsv_cities", "msls", "utm_folder", "aligned", "nordland")
OPTIMIZERS = ("adamw", "adam", "sgd")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")


def spec(default: Any = dataclasses.MISSING, kind: str = "any", low: float | None = None,
         high: float | None = None, choices: Sequence[Any] | None = None, doc: str = "",
         section: type | None = None) -> Any:
    """A config field: its type tag, range/choices, a one-line description and, for nested
    sections (``kind`` "section" or "sections"), the dataclass they parse into."""
    meta = {"kind": kind, "low": low, "high": high, "choices": choices, "doc": doc,
            "section": section}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _num(where: str, v: Any, kind: str) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if kind == "float" and isinstance(v, str):
            try:  # YAML 1.1 reads "1e-5" as a string
                return float(v)
            except ValueError:
                pass
        raise ConfigError(f"{where} = {v!r} must be a{'n integer' if kind == 'int' else ' number'}")
    if kind == "int":
        if float(v) != int(v):
            raise ConfigError(f"{where} = {v!r} must be an integer")
        return int(v)
    if not math.isfinite(float(v)):
        raise ConfigError(f"{where} = {v!r} must be finite")
    return float(v)


def _coerce(where: str, f: dataclasses.Field, v: Any) -> Any:
    kind = f.metadata.get("kind", "any")
    low, high, choices = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("choices")
    if v is None and (f.default is None or kind == "section"):
        return None  # an optional value or section switched off (e.g. ``miner: null``)
    if kind in ("int", "float"):
        v = _num(where, v, kind)
        if (low is not None and v < low) or (high is not None and v > high):
            raise ConfigError(f"{where} = {v!r} is out of range [{low}, {high}]: "
                              f"{f.metadata.get('doc', '')}")
    elif kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError(f"{where} = {v!r} must be true or false")
    elif kind == "str":
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{where} = {v!r} must be a non-empty string")
    elif kind == "size":
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v, v]
        if (not isinstance(v, (list, tuple)) or len(v) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v)):
            raise ConfigError(f"{where} = {v!r} must be [height, width] in pixels")
        v = (int(v[0]), int(v[1]))
    elif kind == "range":
        if (not isinstance(v, (list, tuple)) or len(v) != 2
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in v)
                or not 0.0 <= v[0] < v[1] <= 1.0):
            raise ConfigError(f"{where} = {v!r} must be [start, end] fractions with "
                              "0 <= start < end <= 1")
        v = (float(v[0]), float(v[1]))
    elif kind == "ints":
        if not isinstance(v, (list, tuple)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v):
            raise ConfigError(f"{where} = {v!r} must be a list of non-negative integers")
        v = tuple(int(s) for s in v)
    elif kind == "strs":
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
            raise ConfigError(f"{where} = {v!r} must be a list of strings")
        v = tuple(v)
    elif kind == "section":
        v = parse_section(f.metadata["section"], v, where)
    elif kind == "sections":
        if isinstance(v, Mapping):
            v = [v]
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of mappings")
        v = tuple(parse_section(f.metadata["section"], item, f"{where}[{i}]")
                  for i, item in enumerate(v))
    if choices is not None and v not in choices:
        raise ConfigError(f"{where} = {v!r} must be one of {list(choices)}")
    return v


def parse_section(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and bad values."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are "
                          f"{sorted(known)}. Fix the spelling or remove them.")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _coerce(f"{where}.{name}", f, data[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: the required key {name!r} is missing "
                              f"({f.metadata.get('doc', '')})")
    return cls(**kwargs)


# -- sections -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetConfig:
    """One training dataset: where it is, how it becomes places, and its P x K batch shape."""

    name: str = spec(kind="str", doc="label used in logs and messages")
    kind: str = spec(kind="str", choices=DATASET_KINDS, doc="reader")
    path: str | None = spec(None, kind="str", doc="dataset root (gsv_cities, msls, utm_folder)")
    folders: tuple[str, ...] = spec((), kind="strs",
                                    doc="aligned: traversal folders (or nordland:<season>)")
    seasons: tuple[str, ...] = spec(("summer", "winter"), kind="strs",
                                    doc="nordland: season folders of the shared archive")
    cities: Any = spec(None, doc="gsv_cities/msls: list of cities, 'all', 'train' or 'val'")
    cell_m: float = spec(10.0, kind="float", low=1e-3, doc="msls/utm_folder: place grid (m)")
    place_size: int = spec(1, kind="int", low=1,
                           doc="aligned/nordland: consecutive frames that form one place")
    places_per_batch: int = spec(32, kind="int", low=2, doc="P: places per batch")
    images_per_place: int = spec(4, kind="int", low=2, doc="K: images per place")
    split: tuple[float, float] = spec((0.0, 1.0), kind="range",
                                      doc="contiguous block of places (route/map order) to use")
    on_bad_image: str = spec("error", kind="str", choices=("error", "skip"),
                             doc="missing/unreadable images: stop, or skip with a warning")
    verify_images: bool = spec(False, kind="bool",
                               doc="decode every image before training (slow on big sets)")
    loss_weight: float = spec(1.0, kind="float", low=0.0,
                              doc="weight of this dataset's loss in the sum")


RECALL_METRICS = ("R@1", "R@5", "R@10", "R@1+R@5")  # the last: SelaVPR++'s selection


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop training once validation recall has not improved for ``patience`` validations."""

    patience: int = spec(3, kind="int", low=1,
                         doc="validations in a row without improvement before training stops")
    metric: str | None = spec(None, kind="str", choices=RECALL_METRICS,
                              doc="recall watched (default: data.val.metric)")
    min_delta: float = spec(0.0, kind="float", low=0.0,
                            doc="an improvement must exceed this (recall as a fraction)")


@dataclass(frozen=True)
class ValConfig:
    """Retrieval validation during training (Recall@K at the test size), which also selects
    the best model (``<output>/model_best``) and can stop training early.

    One or several parts, each a database folder and a query folder: ``database`` and
    ``queries`` (lists pair up in order), or ``msls`` (an MSLS root: one part per city of
    ``cities``, by default both validation cities). Every part's queries search the pooled
    database of all parts; a query's positives come from its own part only."""

    database: tuple[str, ...] = spec((), kind="strs",
                                     doc="database folder(s) (or nordland:<season>)")
    queries: tuple[str, ...] = spec((), kind="strs", doc="query folder(s), one per database")
    msls: str | None = spec(None, kind="str",
                            doc="MSLS root: validate on its cities' query/ and database/")
    cities: tuple[str, ...] = spec(("cph", "sf"), kind="strs",
                                   doc="msls: cities (default: MSLS-val's two)")
    name: str = spec("val", kind="str")
    subset: tuple[float, float] | None = spec(None, kind="range",
                                              doc="aligned folders: block of images to use")
    threshold_m: float = spec(25.0, kind="float", low=0.0, doc="positioned sets: positive radius")
    tolerance: int | None = spec(None, kind="int", low=0,
                                 doc="aligned sets: +-N index tolerance")
    every_n_steps: int = spec(0, kind="int", low=0, doc="0: only at the end of training")
    every_n_epochs: int = spec(0, kind="int", low=0, doc="also validate every N epochs (0: no)")
    metric: str = spec("R@1", kind="str", choices=RECALL_METRICS,
                       doc="recall that selects the best model")
    keep_best: bool = spec(True, kind="bool",
                           doc="write the best model so far to <output>/model_best")
    early_stopping: EarlyStoppingConfig | None = spec(None, kind="section",
                                                      section=EarlyStoppingConfig)

    def parts(self) -> list[tuple[str, str]]:
        """(database, queries) folder pairs."""
        if self.msls is not None:
            from vpr_ros.datasets.msls import val_folders

            return [(str(d), str(q)) for d, q in val_folders(self.msls, self.cities)]
        return list(zip(self.database, self.queries))


@dataclass(frozen=True)
class ModelSection:
    config: Any = spec(None, doc="model config YAML (relative to this file) or inline mapping")
    init: str | None = spec(None, kind="str", doc="start from this model directory instead")
    backbone_weights: str | None = spec(None, kind="str",
                                        doc="overrides weights.backbone of the model config")
    train_size: tuple[int, int] | None = spec(None, kind="size", doc="[H, W] while training")
    test_size: tuple[int, int] | None = spec(None, kind="size",
                                             doc="[H, W] recorded in model.json (inference)")
    seed: int = spec(0, kind="int", low=0, doc="seed of the randomly initialised parts")


@dataclass(frozen=True)
class RandAugmentConfig:
    num_ops: int = spec(3, kind="int", low=0, high=16)
    magnitude: int = spec(9, kind="int", low=0, high=30)


@dataclass(frozen=True)
class AugmentConfig:
    randaugment: RandAugmentConfig | None = spec(None, kind="section", section=RandAugmentConfig)


LOSSES = ("multi_similarity", "triplet")
MINERS = ("multi_similarity", "triplet_margin")
TRIPLET_TYPES = ("all", "hard", "semihard", "easy")


@dataclass(frozen=True)
class MinerConfig:
    name: str = spec("multi_similarity", kind="str", choices=MINERS)
    epsilon: float = spec(0.1, kind="float", low=0.0, doc="MS miner margin")
    margin: float = spec(0.1, kind="float", low=0.0,
                         doc="triplet_margin: keep triplets violating this margin")
    type_of_triplets: str = spec("all", kind="str", choices=TRIPLET_TYPES,
                                 doc="triplet_margin: which violating triplets to keep")


@dataclass(frozen=True)
class ExtraLossConfig:
    name: str = spec(kind="str", doc="a loss registered with vpr_ros.train.losses.register_loss")
    weight: float = spec(1.0, kind="float", low=0.0)
    params: dict = spec({}, doc="keyword arguments of the loss")


@dataclass(frozen=True)
class LossConfig:
    name: str = spec("multi_similarity", kind="str", choices=LOSSES,
                     doc="multi_similarity, or triplet (hinge on Euclidean distances)")
    alpha: float = spec(1.0, kind="float", low=0.0, doc="MS positive scale")
    beta: float = spec(50.0, kind="float", low=0.0, doc="MS negative scale")
    base: float = spec(0.0, kind="float", doc="MS similarity offset (lambda)")
    margin: float = spec(0.1, kind="float", low=0.0, doc="triplet: margin m")
    miner: MinerConfig | None = spec(MinerConfig(), kind="section", section=MinerConfig)
    extra: tuple[ExtraLossConfig, ...] = spec((), kind="sections", section=ExtraLossConfig)
    aggregator_extra_weight: float = spec(1.0, kind="float", low=0.0,
                                          doc="weight of the aggregator's extra_loss, if any")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = spec("adamw", kind="str", choices=OPTIMIZERS)
    lr: float = spec(1e-4, kind="float", low=0.0, doc="aggregator (and other head) LR")
    backbone_lr: float | None = spec(None, kind="float", low=0.0,
                                     doc="LR of the trainable backbone parameters (default lr)")
    weight_decay: float = spec(1e-4, kind="float", low=0.0)
    momentum: float = spec(0.9, kind="float", low=0.0, high=1.0, doc="sgd only")


@dataclass(frozen=True)
class SchedulerConfig:
    warmup: int = spec(0, kind="int", low=0, doc="linear warm-up length (in unit)")
    milestones: tuple[int, ...] = spec((), kind="ints", doc="multiply LR by gamma at these")
    gamma: float = spec(0.1, kind="float", low=0.0, high=1.0)
    unit: str = spec("step", kind="str", choices=("step", "epoch"))


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = spec(-1, kind="int", low=-1, doc="optimizer steps (-1: use max_epochs)")
    max_epochs: int | None = spec(None, kind="int", low=1)
    batches_per_epoch: int | None = spec(None, kind="int", low=1,
                                         doc="fixed epoch length (default: one pass of places)")
    accumulate_grad_batches: int = spec(1, kind="int", low=1)
    gradient_clip_val: float | None = spec(None, kind="float", low=0.0)
    precision: str = spec("32-true", kind="str", choices=PRECISIONS)
    accelerator: str = spec("auto", kind="str", choices=("auto", "cpu", "gpu", "cuda", "mps"))
    devices: Any = spec("auto", doc="'auto', a count, or a list of device ids")
    num_nodes: int = spec(1, kind="int", low=1)
    strategy: str = spec("auto", kind="str", doc="Lightning strategy: auto, ddp, ...")
    num_workers: int = spec(4, kind="int", low=0, doc="data loader workers per dataset")
    log_every_n_steps: int = spec(20, kind="int", low=1)
    checkpoint_every_n_steps: int = spec(500, kind="int", low=1)
    seed: int = spec(0, kind="int", low=0)
    deterministic: bool = spec(False, kind="bool")
    progress_bar: bool = spec(True, kind="bool")
    threads: int | None = spec(None, kind="int", low=1, doc="torch CPU threads")


@dataclass(frozen=True)
class FeatureCacheConfig:
    """Frozen backbones: compute backbone features once per image (and augmentation variant)."""

    enabled: Any = spec("auto", choices=("auto", True, False),
                        doc="auto: on exactly when the backbone has no trainable parameter")
    variants: int = spec(1, kind="int", low=1,
                         doc="views cached per image: 1 clean + (variants-1) RandAugmented")
    batch_size: int = spec(64, kind="int", low=1)
    dir: str | None = spec(None, kind="str", doc="where to keep the cache (default output/cache)")


@dataclass(frozen=True)
class DataConfig:
    train: tuple[DatasetConfig, ...] = spec(kind="sections", doc="training datasets",
                                          section=DatasetConfig)
    val: ValConfig | None = spec(None, kind="section", section=ValConfig)


@dataclass(frozen=True)
class TrainConfig:
    source: Path
    name: str
    model: ModelSection
    data: DataConfig
    augment: AugmentConfig
    loss: LossConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    trainer: TrainerConfig
    feature_cache: FeatureCacheConfig
    output: Path
    description: str = ""

    def resolve(self, p: str | Path) -> Path:
        """A path from the config: absolute, or relative to the config file if it exists
        there, else relative to the current directory."""
        q = Path(p).expanduser()
        if q.is_absolute():
            return q
        near = self.source.parent / q
        return near if near.exists() else q


_TOP_KEYS = {"name", "description", "model", "data", "augment", "loss", "optimizer",
             "scheduler", "trainer", "feature_cache", "output"}


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """``key.sub=value`` strings (values parsed as YAML) applied to the raw config mapping.
    ``data.train.0.places_per_batch=8`` indexes lists."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. trainer.max_steps=100)")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"--set {key}")
        node: Any = out
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                try:
                    j = int(part)
                    node[j]
                except (ValueError, IndexError):
                    raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i])} is a list; "
                                      f"{part!r} is not a valid index") from None
                if last:
                    node[j] = value
                else:
                    node = node[j]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i])} is not a section of "
                                  f"{source}")
    return out


def train_config_from_dict(data: Any, source: str | Path) -> TrainConfig:
    src = Path(source)
    where = str(src)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are "
                          f"{sorted(_TOP_KEYS)}. Fix the spelling or remove them.")
    for key in ("model", "data"):
        if key not in data:
            raise ConfigError(f"{where}: the '{key}' section is missing")
    model = parse_section(ModelSection, data["model"], f"{where}: model")
    if (model.config is None) == (model.init is None):
        raise ConfigError(f"{where}: model: give exactly one of 'config' (a model config YAML or "
                          "mapping: train from it) and 'init' (a model directory: fine-tune it)")
    data_cfg = parse_section(DataConfig, data["data"], f"{where}: data")
    if not data_cfg.train:
        raise ConfigError(f"{where}: data.train lists no dataset; nothing to train on")
    names = [d.name for d in data_cfg.train]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: data.train names must be unique, got {names}")
    for i, d in enumerate(data_cfg.train):
        _check_dataset(d, f"{where}: data.train[{i}]")
    if data_cfg.val is not None:
        _check_val(data_cfg.val, f"{where}: data.val")
    out = data.get("output") or f"runs/{data.get('name') or src.stem}"
    if not isinstance(out, str):
        raise ConfigError(f"{where}: output must be a folder path string")
    cfg = TrainConfig(
        source=src, name=str(data.get("name") or src.stem),
        description=str(data.get("description") or ""), model=model, data=data_cfg,
        augment=parse_section(AugmentConfig, data.get("augment"), f"{where}: augment"),
        loss=parse_section(LossConfig, data.get("loss"), f"{where}: loss"),
        optimizer=parse_section(OptimizerConfig, data.get("optimizer"), f"{where}: optimizer"),
        scheduler=parse_section(SchedulerConfig, data.get("scheduler"), f"{where}: scheduler"),
        trainer=parse_section(TrainerConfig, data.get("trainer"), f"{where}: trainer"),
        feature_cache=parse_section(FeatureCacheConfig, data.get("feature_cache"),
                                    f"{where}: feature_cache"),
        output=Path(out))
    if cfg.trainer.max_steps == -1 and cfg.trainer.max_epochs is None:
        raise ConfigError(f"{where}: trainer: set max_steps or max_epochs (training length)")
    if cfg.scheduler.unit == "epoch" and cfg.trainer.batches_per_epoch is None \
            and cfg.trainer.max_epochs is None:
        raise ConfigError(f"{where}: scheduler.unit is 'epoch' but the epoch length is unknown; "
                          "set trainer.max_epochs or trainer.batches_per_epoch")
    return cfg


def _check_dataset(d: DatasetConfig, where: str) -> None:
    c = d.cities
    if not (c is None or (isinstance(c, str) and c) or (
            isinstance(c, (list, tuple)) and c and all(isinstance(x, str) and x for x in c))):
        raise ConfigError(f"{where} ({d.name}): cities = {c!r} must be a list of city names, "
                          "'all', or (msls) 'train' / 'val'")
    if d.kind in ("gsv_cities", "msls", "utm_folder") and not d.path:
        raise ConfigError(f"{where} ({d.name}): kind {d.kind!r} needs 'path' (the dataset root)")
    if d.kind == "aligned" and len(d.folders) < 1:
        raise ConfigError(f"{where} ({d.name}): kind 'aligned' needs 'folders' (two or more "
                          "index-aligned traversal folders)")
    if d.kind in ("aligned", "nordland"):
        n_trav = len(d.folders) if d.kind == "aligned" else len(d.seasons)
        if n_trav * d.place_size < d.images_per_place:
            raise ConfigError(f"{where} ({d.name}): a place has {n_trav} traversal(s) x "
                              f"place_size {d.place_size} = {n_trav * d.place_size} images, fewer "
                              f"than images_per_place={d.images_per_place}; raise place_size or "
                              "lower images_per_place")
    irrelevant = {"gsv_cities": ("folders", "cell_m", "place_size"),
                  "msls": ("folders", "place_size"),
                  "utm_folder": ("folders", "cities", "place_size"),
                  "aligned": ("path", "cities", "cell_m"),
                  "nordland": ("path", "folders", "cities", "cell_m")}[d.kind]
    defaults = {f.name: f.default for f in dataclasses.fields(DatasetConfig)}
    given = [k for k in irrelevant if getattr(d, k) != defaults[k]]
    if given:
        raise ConfigError(f"{where} ({d.name}): key(s) {given} do not apply to kind "
                          f"{d.kind!r}; remove them")


def _check_val(v: ValConfig, where: str) -> None:
    if v.msls is not None and (v.database or v.queries):
        raise ConfigError(f"{where}: give either msls (an MSLS root) or database + queries, "
                          "not both")
    if v.msls is None:
        if not v.database or len(v.database) != len(v.queries):
            raise ConfigError(f"{where}: database and queries must name the same number of "
                              f"folders (one per part), got {len(v.database)} and "
                              f"{len(v.queries)}")
    elif not v.cities:
        raise ConfigError(f"{where}: cities is empty; name the MSLS cities to validate on")


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read, override (``--set``) and validate a training YAML."""
    data = load_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides, str(path))
    return train_config_from_dict(data, path)
