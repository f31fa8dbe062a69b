"""Tiny real model directories of the zoo's models with extra outputs (no tests here).

SelaVPR++ (float head + 512-bit hash head) and CQVPR (contextual queries + local head) on the
packaged ImageNet EfficientNet-Lite0 at 96 x 96 px (a 3 x 3 feature grid, 9 x 9 local grid), with
small seeded random heads: real components end to end, fast enough for a 2-core CI machine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

_BACKBONE = {"name": "efficientnet_lite",
             "params": {"variant": "lite0", "features": "head", "trainable_stages": 0}}
_INPUT = {"size": [96, 96], "resize": "stretch"}

CONFIGS = {
    "selavpr_tiny": {"aggregator": {"name": "selavpr",
                                    "params": {"out_dim": 128, "hash_bits": 512, "branches": 1}}},
    "cqvpr_tiny": {"aggregator": {"name": "cqvpr",
                                  "params": {"num_queries": 4, "query_dim": 32, "num_layers": 1,
                                             "num_heads": 4, "local_dim": 16,
                                             "local_hidden": 32}}},
}


def zoo_model_dir(name: str, root: Path) -> Path:
    """The model directory ``name`` (a key of :data:`CONFIGS`) under ``root``, made once per
    test session."""
    from vpr_ros.models.model_dir import create_model_dir

    out = root / name
    if (out / "model.json").is_file():
        return out
    tmp = root / f".{name}.{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"name": name, "backbone": _BACKBONE, **CONFIGS[name],
                                      "input": _INPUT, "weights": {"backbone": "package"}}))
    create_model_dir(config, tmp / "model")
    try:
        (tmp / "model").rename(out)
    except OSError:  # another module of this session made it first
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return out
