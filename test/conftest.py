"""Shared fixtures: real data from ../shared/data, small real model directories."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# DDS traffic of the tests stays on loopback, and each test session gets its own domain so
# concurrent runs on one machine never hear each other. Subprocesses inherit both.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "config" / "models"


@pytest.fixture(scope="session")
def nordland_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vpr_ros.datasets.nordland import nordland_root as extract, shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("shared Nordland data (../shared/data) is not present on this machine")
    return extract(os.environ.get("VPR_CACHE_DIR") or tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def nordland_pairs(nordland_root: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """40 summer/winter image pairs spread along the route (index-aligned)."""
    from vpr_ros.datasets.nordland import frame_numbers, load_images

    frames = frame_numbers(nordland_root)[100:3500:85][:40]
    return (load_images(nordland_root, "summer", frames),
            load_images(nordland_root, "winter", frames))


@pytest.fixture(scope="session")
def effnet_qaa_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model directory: packaged ImageNet EfficientNet-Lite0 + random QAA head."""
    from vpr_ros.models.model_dir import create_model_dir

    out = tmp_path_factory.mktemp("models") / "qaa_effnetlite0"
    create_model_dir(CONFIGS / "qaa_effnetlite0.yaml", out)
    return out


@pytest.fixture(scope="session")
def effnet_gem_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model directory: packaged ImageNet EfficientNet-Lite0 + GeM (no random parts)."""
    from vpr_ros.models.model_dir import create_model_dir

    out = tmp_path_factory.mktemp("models") / "gem_effnetlite0"
    create_model_dir(CONFIGS / "gem_effnetlite0.yaml", out)
    return out


@pytest.fixture(scope="session")
def model96(effnet_gem_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GeM model directory recorded at 96x96 (no size-dependent weights): the small real
    model of the node and demo tests, made once per session."""
    from test_node_common import small_model_dir

    return small_model_dir(effnet_gem_model_dir, tmp_path_factory.getbasetemp())
