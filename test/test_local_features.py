"""Keypoint extraction: a frame shrunk before extraction (``scale``) still gives keypoints in
the full frame's pixels, on the same convention as a full-resolution extraction (so that a
map built at full resolution and a query extracted smaller agree); bad scales are refused."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.mapdb.feature_matching import match_features
from vpr_ros.runtime.local_features import FeatureExtractor


@pytest.fixture(scope="module")
def street() -> np.ndarray:
    from vpr_ros.demo.scenario import Route, ScenarioConfig, World, render_with_depth

    cfg = ScenarioConfig(image_size=(480, 640))
    route = Route(cfg)
    return render_with_depth(World(cfg), cfg, *route.pose(30.0), 1)[0]


@pytest.mark.parametrize("scale", [0.5, 0.75])
def test_scaled_sift_gives_full_frame_pixels(street: np.ndarray, scale: float) -> None:
    full = FeatureExtractor("sift", 1000).extract(street)
    small = FeatureExtractor("sift", 1000, scale=scale).extract(street)
    pairs = match_features(small, full)
    assert len(pairs) >= 100
    offset = small.xy[pairs[:, 0]] - full.xy[pairs[:, 1]]
    dist = np.linalg.norm(offset, axis=1)
    # the same image feature found at both resolutions lies at the same full-frame pixel: no
    # systematic offset (a wrong pixel-centre convention gives 0.25-0.5 px) and a small spread
    assert np.abs(np.median(offset, axis=0)).max() < 0.05, np.median(offset, axis=0)
    assert np.median(dist) < 0.3, np.median(dist)


def test_scaled_orb_keypoints_lie_in_the_full_frame(street: np.ndarray) -> None:
    """ORB's positions are whole pixels of its pyramid levels (1-2 px apart between
    resolutions); what must hold is that they are given in the full frame."""
    full = FeatureExtractor("orb", 1000).extract(street)
    small = FeatureExtractor("orb", 1000, scale=0.5).extract(street)
    pairs = match_features(small, full)
    dist = np.linalg.norm(small.xy[pairs[:, 0]] - full.xy[pairs[:, 1]], axis=1)
    assert (dist < 3).sum() >= 50 and np.median(dist[dist < 3]) < 2.0
    h, w = street.shape[:2]
    assert (small.xy >= -0.5).all() and (small.xy[:, 0] <= w - 0.5).all() \
        and (small.xy[:, 1] <= h - 0.5).all()


def test_a_scale_outside_its_range_is_refused() -> None:
    for bad in (0.0, 0.05, 1.5):
        with pytest.raises(ConfigError, match="scale"):
            FeatureExtractor("sift", 1000, scale=bad)
