"""Absolute trajectory error with evo, the way ``evo_ape`` computes it.

A trajectory here is a list of ``(stamp_ns, position xyz, quaternion xyzw)``. Ground truth
rarely shares the estimate's stamps, so it is interpolated at each estimated stamp (position
linearly, orientation by slerp; never across gaps longer than ``max_gap_s``); the pairs then go
to evo's own ``main_ape.ape`` with SE(3) Umeyama alignment (``evo_ape ... --align``, no scale
correction) and the translation part as the error, and its statistics come back unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.mapdb.poses import PoseTrack, interpolate

Sample = tuple[int, Sequence[float], Sequence[float]]  # stamp_ns, (x, y, z), (qx, qy, qz, qw)


@dataclass(frozen=True)
class AteResult:
    """evo's APE statistics (metres) over ``pairs`` associated poses, after SE(3) alignment."""

    rmse: float
    mean: float
    median: float
    max: float
    std: float
    pairs: int
    aligned_xyz: np.ndarray      # the estimate after alignment, (pairs, 3)
    reference_xyz: np.ndarray    # ground truth at the same stamps, (pairs, 3)
    stamps_ns: np.ndarray

    def as_dict(self) -> dict[str, float]:
        return {"rmse_m": self.rmse, "mean_m": self.mean, "median_m": self.median,
                "max_m": self.max, "std_m": self.std, "pairs": self.pairs}


def track_from_samples(samples: Iterable[Sample]) -> PoseTrack:
    rows = list(samples)
    if not rows:
        return PoseTrack.from_samples([], np.zeros((0, 3)), np.zeros((0, 4)))
    return PoseTrack.from_samples([int(s) for s, _, _ in rows], [p for _, p, _ in rows],
                                  [q for _, _, q in rows])


def _pose_matrix(position: Sequence[float], quat_xyzw: Sequence[float]) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    m = np.eye(4)
    m[:3, :3] = Rotation.from_quat(np.asarray(quat_xyzw, dtype=np.float64)).as_matrix()
    m[:3, 3] = np.asarray(position, dtype=np.float64)
    return m


def absolute_trajectory_error(estimate: Iterable[Sample], ground_truth: PoseTrack,
                              max_gap_s: float = 1.0, name: str = "estimate") -> AteResult:
    """evo APE (translation part, SE(3)-aligned) of ``estimate`` against ``ground_truth``."""
    from evo.core.metrics import PoseRelation
    from evo.core.trajectory import PoseTrajectory3D
    from evo.main_ape import ape

    if ground_truth.orientations is None:
        raise InputError("ground truth has no orientations; ATE needs full poses (use an "
                         "Odometry or PoseStamped topic)")
    stamps, est_poses, ref_poses = [], [], []
    for stamp, pos, quat in estimate:
        ref = interpolate(ground_truth, int(stamp), max_gap_s)
        if ref is None or ref.orientation is None:
            continue
        stamps.append(int(stamp))
        est_poses.append(_pose_matrix(pos, quat))
        ref_poses.append(_pose_matrix(ref.position, ref.orientation))
    if len(stamps) < 3:
        raise InputError(f"{name}: only {len(stamps)} poses fall inside the ground truth's time "
                         "span; ATE needs at least 3 (do the topics come from the same run and "
                         "clock?)")
    t = np.asarray(stamps, dtype=np.float64) / 1e9
    traj_ref = PoseTrajectory3D(poses_se3=ref_poses, timestamps=t)
    traj_est = PoseTrajectory3D(poses_se3=est_poses, timestamps=t)
    logging.getLogger("evo").setLevel(logging.WARNING)  # ape() logs its table at INFO
    # ape() aligns traj_est in place: afterwards it is the aligned estimate.
    result = ape(traj_ref, traj_est, PoseRelation.translation_part, align=True,
                 correct_scale=False)
    aligned = traj_est
    st = result.stats
    return AteResult(rmse=float(st["rmse"]), mean=float(st["mean"]),
                     median=float(st["median"]), max=float(st["max"]), std=float(st["std"]),
                     pairs=len(stamps), aligned_xyz=np.asarray(aligned.positions_xyz),
                     reference_xyz=np.asarray(traj_ref.positions_xyz),
                     stamps_ns=np.asarray(stamps, dtype=np.int64))


def plot_trajectories(path: Path, ground_truth: PoseTrack, results: dict[str, AteResult],
                      title: str = "trajectories (SE(3)-aligned to ground truth)",
                      closures: Optional[Sequence[tuple[Sequence[float], Sequence[float], bool]]]
                      = None,
                      planted: Optional[tuple[Sequence[float], Sequence[float]]] = None
                      ) -> Path:
    """Ground truth and every aligned estimate in one top view, ATE RMSE in the legend;
    optional closure segments (a, b, correct) and a planted wrong closure drawn between
    ground-truth positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6))
    gt = ground_truth.positions
    ax.plot(gt[:, 0], gt[:, 1], color="0.2", lw=1.6, label="ground truth")
    colours = ["tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for (label, res), colour in zip(results.items(), colours):
        xyz = res.aligned_xyz
        ax.plot(xyz[:, 0], xyz[:, 1], color=colour, lw=1.1,
                label=f"{label} (ATE RMSE {res.rmse:.2f} m)")
    for a, b, ok in closures or []:
        ax.plot([a[0], b[0]], [a[1], b[1]], color="tab:green" if ok else "magenta",
                lw=0.4 if ok else 1.2, alpha=0.5 if ok else 1.0)
    if closures:
        ax.plot([], [], color="tab:green", lw=0.6, label="loop closures (correct)")
        if any(not ok for _, _, ok in closures):
            ax.plot([], [], color="magenta", lw=1.2, label="loop closures (wrong)")
    if planted is not None:
        a, b = planted
        ax.plot([a[0], b[0]], [a[1], b[1]], color="black", lw=1.4, ls="--",
                label="planted wrong closure")
    ax.set_aspect("equal")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
