"""3-D points for keyframe keypoints, from an aligned depth image or a calibrated stereo pair.

Why keypoints get 3-D points at all: with them a revisit is verified by PnP, which gives the
query camera's *metric* pose relative to the keyframe (a loop-closure edge a pose graph can use
as is, a relocalization better than "the pose of the keyframe you look like"); without them
only the essential matrix is possible (rotation and the translation's direction).

Points are kept in the keyframe's own camera frame, not the map frame: a pose-graph back end
may move keyframes later, and points expressed relative to their keyframe move with it.

Depth (decoded to metres by :func:`vpr_ros.runtime.image_codec.decode_depth`: ``16UC1``
millimetres, ``32FC1`` metres, 0 / NaN = no reading) must be registered to the colour image (same size, same camera). Each keypoint
takes the median of the valid readings in a 3x3 window, and is left without a point when the
window straddles a depth edge (readings spread over more than ``edge_ratio`` of the median),
which is where a keypoint on a silhouette would otherwise get the background's depth.

Stereo: keypoints of the right image are matched to the left's (ratio + mutual), kept when the
known extrinsic's epipolar geometry holds (Sampson error below a threshold), and triangulated;
points behind either camera, beyond ``max_depth_m`` or reprojecting badly are dropped.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.runtime.local_features import LocalFeatures

def points_from_depth(features: LocalFeatures, camera: CameraModel, depth_m: np.ndarray,
                      max_depth_m: float = 40.0, edge_ratio: float = 0.1) -> np.ndarray:
    """(n, 3) float32 camera-frame points of the keypoints, NaN rows where the depth image has
    no trustworthy reading there."""
    h, w = depth_m.shape[:2]
    if (h, w) != (camera.height, camera.width):
        raise InputError(f"depth image is {w}x{h} but camera {camera.name!r} is "
                         f"{camera.width}x{camera.height}; the depth image must be registered "
                         "to the colour image (same size, same camera)")
    n = len(features)
    out = np.full((n, 3), np.nan, np.float32)
    if n == 0:
        return out
    u = np.clip(np.rint(features.xy[:, 0]).astype(np.int64), 0, w - 1)
    v = np.clip(np.rint(features.xy[:, 1]).astype(np.int64), 0, h - 1)
    offsets = np.array([(du, dv) for dv in (-1, 0, 1) for du in (-1, 0, 1)])
    uu = np.clip(u[:, None] + offsets[None, :, 0], 0, w - 1)
    vv = np.clip(v[:, None] + offsets[None, :, 1], 0, h - 1)
    window = depth_m[vv, uu]                                    # (n, 9)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: no reading there
        med = np.nanmedian(window, axis=1)
        spread = np.nanmax(window, axis=1) - np.nanmin(window, axis=1)
    valid = np.isfinite(med) & (med > 0) & (med <= max_depth_m) & \
        (spread <= edge_ratio * med) & (np.sum(np.isfinite(window), axis=1) >= 5)
    if valid.any():
        out[valid] = camera.back_project(features.xy[valid], med[valid]).astype(np.float32)
    return out


def points_from_stereo(left: LocalFeatures, right: LocalFeatures, left_cam: CameraModel,
                       right_cam: CameraModel, left_from_right: np.ndarray,
                       max_error_px: float = 1.0, max_depth_m: Optional[float] = None,
                       ratio: float = 0.8) -> np.ndarray:
    """(n_left, 3) float32 points in the left camera frame for the left keypoints that match a
    right keypoint consistently with the calibrated extrinsic ``left_from_right`` (4x4,
    X_left = T X_right); NaN rows elsewhere. ``max_depth_m`` defaults to 100 baselines (beyond
    that a pixel of disparity error is more than 1 % of depth... and then much more)."""
    import cv2

    from vpr_ros.mapdb.feature_matching import match_features
    from vpr_ros.mapdb.transforms import sampson, skew

    t_lr = np.asarray(left_from_right, dtype=np.float64)
    if t_lr.shape != (4, 4) or not np.isfinite(t_lr).all():
        raise InputError("stereo extrinsic must be a finite 4x4 transform")
    out = np.full((len(left), 3), np.nan, np.float32)
    baseline = float(np.linalg.norm(t_lr[:3, 3]))
    if baseline < 1e-4:
        raise InputError(f"stereo baseline is {baseline:.6f} m; the two cameras are at the "
                         "same place, which gives no depth: check the stereo extrinsic")
    pairs = match_features(left, right, ratio, mutual=True)
    if len(pairs) < 1:
        return out
    xl = left_cam.normalize(left.xy[pairs[:, 0]])
    xr = right_cam.normalize(right.xy[pairs[:, 1]])
    # right -> left: X_left = R X_right + t, so x_left^T [t]x R x_right = 0
    r, t = t_lr[:3, :3], t_lr[:3, 3]
    focal = 0.5 * (left_cam.focal + right_cam.focal)
    ok = sampson(skew(t) @ r, xr, xl) * focal <= max_error_px
    if not ok.any():
        return out
    pairs, xl, xr = pairs[ok], xl[ok], xr[ok]
    # projection matrices in the left frame: left = [I | 0], right = T_rl = inv(T_lr)
    t_rl = np.linalg.inv(t_lr)
    p_left = np.hstack([np.eye(3), np.zeros((3, 1))])
    p_right = t_rl[:3, :]
    hom = cv2.triangulatePoints(p_left, p_right, xl.T.astype(np.float64),
                                xr.T.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        pts = (hom[:3] / hom[3]).T
    in_right = pts @ t_rl[:3, :3].T + t_rl[:3, 3]
    limit = max_depth_m if max_depth_m is not None else 100.0 * baseline
    with np.errstate(divide="ignore", invalid="ignore"):
        err_l = np.linalg.norm(pts[:, :2] / pts[:, 2:3] - xl, axis=1) * left_cam.focal
        err_r = np.linalg.norm(in_right[:, :2] / in_right[:, 2:3] - xr, axis=1) * \
            right_cam.focal
    good = np.isfinite(pts).all(1) & (pts[:, 2] > 0) & (in_right[:, 2] > 0) & \
        (pts[:, 2] <= limit) & (err_l <= max_error_px) & (err_r <= max_error_px)
    out[pairs[good, 0]] = pts[good].astype(np.float32)
    return out
