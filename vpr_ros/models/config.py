"""Plain-data model configuration: the single description every tool builds a model from.

A config is what ``model.json`` stores and what ``config/models/*.yaml`` holds: a backbone and an
aggregator (each a registered name plus keyword parameters) and the input contract (size,
normalisation, resize geometry and interpolation). It is validated here, before any torch module
is built, so that a typo in a YAML file is reported as the key that is wrong rather than as a
torch traceback.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


from vpr_ros.errors import ConfigError
from vpr_ros.plain_data import parse_json, parse_yaml, read_text

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_POLICIES = ("stretch", "center_crop")
#: How a frame is resized to the input size (``vpr_ros.runtime.preprocess`` implements each):
#: ``opencv``: uint8 with OpenCV, ``INTER_AREA`` shrinking and ``INTER_LINEAR`` enlarging (the
#: default, and what a model.json without the field means); ``bilinear_antialias`` and
#: ``bicubic_antialias``: RGB scaled to [0, 1] floats, then torch's antialiased resize, neither
#: rounded nor clamped (torchvision's ``Resize(antialias=True)`` on a float tensor: the official
#: evaluation transforms of QAA / VPR-methods-evaluation and of BoQ respectively).
INTERPOLATIONS = ("opencv", "bilinear_antialias", "bicubic_antialias")
#: Component parameters whose meaning changed when a component was corrected to follow its
#: paper, with the value a model.json that does not state them was made with. New model.json
#: files always state them (``model_dir.recorded_config``); old ones keep loading as they were
#: (``model_dir.with_legacy_defaults``), so their encodings and fingerprints do not change.
#: CQVPR: ``design: paper`` since the full paper was available; ``decoder`` before.
LEGACY_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("aggregator", "cqvpr"): {"design": "decoder"},
}
#: Largest input height or width a model may ask for, in pixels. Why a bound: a ViT's attention
#: grows with the square of its token count, so ``input.size: [30000, 30000]`` made an ONNX
#: export grow to 17.7 GB until the kernel killed it. At 1024 x 1024 a DINOv2 ViT-B has 5329
#: tokens and one attention map of 1.4 GB; every shipped model uses 322 or less.
MAX_INPUT_SIDE = 1024


@dataclass(frozen=True)
class ComponentConfig:
    """A registered component name and the keyword arguments its constructor takes."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": copy.deepcopy(self.params)}


@dataclass(frozen=True)
class InputConfig:
    """What the encoder expects: RGB images resized to ``size`` (H, W) with ``interpolation``
    (``resize``: stretched, or scaled to cover and centre-cropped), then normalised."""

    size: tuple[int, int] = (322, 322)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "stretch"
    interpolation: str = "opencv"

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "interpolation": self.interpolation}


@dataclass(frozen=True)
class ModelConfig:
    """Backbone + aggregator + input contract. ``name`` is informational only."""

    backbone: ComponentConfig
    aggregator: ComponentConfig
    input: InputConfig = field(default_factory=InputConfig)
    name: str = "model"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backbone": self.backbone.to_dict(),
                "aggregator": self.aggregator.to_dict(), "input": self.input.to_dict()}

    def with_input_size(self, size: tuple[int, int]) -> "ModelConfig":
        """The same model at another input size (e.g. 224 for training, 322 for test)."""
        inp = InputConfig(size=tuple(size), mean=self.input.mean, std=self.input.std,
                          resize=self.input.resize, interpolation=self.input.interpolation)
        return ModelConfig(self.backbone, self.aggregator, inp, self.name)


_TOP_KEYS = {"name", "backbone", "aggregator", "input", "weights", "description"}
#: The type of every top-level field a config or model.json may hold (a wrong type is refused
#: here, before any code uses the value).
_TOP_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "description": (str,), "weights": (dict,), "format": (str,),
    "version": (int,), "descriptor_dim": (int,), "fingerprint": (str,),
    "backbone": (str, dict), "aggregator": (str, dict), "input": (dict,)}
_COMPONENT_KEYS = {"name", "params"}
_INPUT_KEYS = {"size", "mean", "std", "resize", "interpolation"}


def check_types(where: str, data: Mapping[str, Any],
                types: Mapping[str, tuple[type, ...]]) -> None:
    """ConfigError naming the first present key whose value is not of its type (None counts as
    absent; a bool is not an int)."""
    names = {str: "a string", int: "an integer", dict: "a mapping", list: "a list",
             float: "a number"}
    for key, allowed in types.items():
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            want = " or ".join(names.get(t, t.__name__) for t in allowed)
            raise ConfigError(f"{where}: '{key}' is {value!r:.60}, expected {want}")


def _check_keys(where: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}. "
                          "Fix the spelling or remove them.")


def _component(where: str, data: Any) -> ComponentConfig:
    if isinstance(data, str):
        return ComponentConfig(name=data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'name' and 'params', got "
                          f"{type(data).__name__}")
    _check_keys(where, data, _COMPONENT_KEYS)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: a registered component name is required")
    params = data.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params: expected a mapping, got {type(params).__name__}")
    return ComponentConfig(name=name, params=dict(params))


def _triple(where: str, value: Any) -> tuple[float, float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) for v in value)):
        raise ConfigError(f"{where}: expected three numbers (R, G, B), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def check_input_side(size: Any, where: str) -> None:
    """ConfigError unless both sides are within ``MAX_INPUT_SIDE``."""
    if max(int(s) for s in size) > MAX_INPUT_SIDE:
        raise ConfigError(f"{where}: {list(size)} exceeds the largest input side, "
                          f"{MAX_INPUT_SIDE} px (memory grows with its square); use a smaller "
                          "size, e.g. [322, 322]")


def _input(data: Any) -> InputConfig:
    if data is None:
        return InputConfig()
    if not isinstance(data, Mapping):
        raise ConfigError(f"input: expected a mapping, got {type(data).__name__}")
    _check_keys("input", data, _INPUT_KEYS)
    size = data.get("size", [322, 322])
    if isinstance(size, int):
        size = [size, size]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ConfigError(f"input.size: expected [height, width] in pixels, got {size!r}")
    check_input_side(size, "input.size")
    resize = data.get("resize", "stretch")
    if resize not in RESIZE_POLICIES:
        raise ConfigError(f"input.resize: {resize!r} is not one of {list(RESIZE_POLICIES)}")
    # Absent in model.json files written before the field existed: they were all made with
    # OpenCV's resize, so that is what they keep (their maps stay valid).
    interpolation = data.get("interpolation", "opencv")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"input.interpolation: {interpolation!r} is not one of "
                          f"{list(INTERPOLATIONS)}")
    std = _triple("input.std", data.get("std", IMAGENET_STD))
    if min(std) <= 0:
        raise ConfigError(f"input.std: every value must be > 0, got {list(std)}")
    return InputConfig(size=(int(size[0]), int(size[1])),
                       mean=_triple("input.mean", data.get("mean", IMAGENET_MEAN)),
                       std=std, resize=resize, interpolation=interpolation)


def model_config_from_dict(data: Any, source: str = "config") -> ModelConfig:
    """Validate a plain mapping (parsed YAML/JSON) into a :class:`ModelConfig`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got "
                          f"{type(data).__name__}")
    _check_keys(source, data, _TOP_KEYS | {"format", "version", "descriptor_dim", "fingerprint"})
    check_types(source, data, _TOP_TYPES)
    for key in ("backbone", "aggregator"):
        if key not in data:
            raise ConfigError(f"{source}: the '{key}' section is missing")
    return ModelConfig(backbone=_component(f"{source}: backbone", data["backbone"]),
                       aggregator=_component(f"{source}: aggregator", data["aggregator"]),
                       input=_input(data.get("input")),
                       name=str(data.get("name", Path(source).stem if source else "model")))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) file into a dict, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    text = read_text(p, ConfigError)
    data = parse_json(text, str(p)) if p.suffix == ".json" else parse_yaml(text, str(p))
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data
