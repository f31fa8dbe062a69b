"""EuRoC MAV sequences in the ASL layout (``mav0/cam0``, ``mav0/cam1``): stereo frames, their
calibration as :class:`~vpr_ros.mapdb.camera.CameraModel`, and ground-truth body poses.

Why this data: EuRoC's VI-sensor is a calibrated global-shutter stereo pair (752x480,
radial-tangential distortion, Kalibr extrinsics) with Vicon ground truth, so every relative
pose between two of its images is known: the stereo extrinsic within a frame pair, and
``T_cam_a^-1 T_world_body(a)^-1 T_world_body(b) T_cam_b`` across time. That makes it a test of
the verifier's *metric* output (essential-matrix rotation and direction, PnP pose), not just of
its verdicts. The folder is the one ``find_dataset('euroc_micro')`` finds: Kimera-VIO's
``tests/data/MicroEurocDataset`` (the first 95 stereo frames of V1_01_easy) with the
ground truth of V1_01_easy from open_vins' ``ov_data/euroc_mav`` under ``groundtruth/``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.mapdb.camera import CameraModel

NAME = "euroc_micro"
SOURCE = ("MIT-SPARK/Kimera-VIO tests/data/MicroEurocDataset (images, calibration) and "
          "rpng/open_vins ov_data/euroc_mav/V1_01_easy.csv (ground truth), copied to "
          "<data>/euroc_micro/{mav0,groundtruth/V1_01_easy.csv}")


def _read_sensor_yaml(path: Path) -> dict:
    import yaml

    text = path.read_text()
    if text.startswith("%YAML"):
        text = text.split("\n", 1)[1]  # OpenCV's YAML 1.0 directive; PyYAML wants none
    return yaml.safe_load(text)


@dataclass(frozen=True)
class EurocCamera:
    """One camera: its model (mount = camera pose in the body/IMU frame) and its frames."""

    model: CameraModel
    body_from_camera: np.ndarray        # 4x4
    stamps_ns: np.ndarray               # (n,) int64
    files: tuple[Path, ...]

    def image(self, i: int) -> np.ndarray:
        """Frame i as a gray uint8 image."""
        import cv2

        img = cv2.imread(str(self.files[i]), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise InputError(f"cannot read {self.files[i]}")
        return img


def _matrix_to_pose7(t: np.ndarray) -> tuple[float, ...]:
    from scipy.spatial.transform import Rotation

    q = Rotation.from_matrix(t[:3, :3]).as_quat()
    return (*(float(v) for v in t[:3, 3]), *(float(v) for v in q))


def read_camera(root: Path, name: str) -> EurocCamera:
    folder = root / "mav0" / name
    cfg = _read_sensor_yaml(folder / "sensor.yaml")
    t_bs = np.asarray(cfg["T_BS"]["data"], dtype=np.float64).reshape(4, 4)
    fu, fv, cu, cv = (float(v) for v in cfg["intrinsics"])
    width, height = (int(v) for v in cfg["resolution"])
    dist = cfg.get("distortion_model", "radial-tangential")
    model = {"radial-tangential": "plumb_bob", "equidistant": "equidistant"}.get(dist)
    if model is None:
        raise InputError(f"{folder}/sensor.yaml: distortion model {dist!r} is not supported")
    cam = CameraModel(name, width, height, (fu, 0.0, cu, 0.0, fv, cv, 0.0, 0.0, 1.0), model,
                      tuple(float(v) for v in cfg["distortion_coefficients"]), name, "imu4",
                      _matrix_to_pose7(t_bs))  # type: ignore[arg-type]
    stamps, files = [], []
    with open(folder / "data.csv", newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].startswith("#"):
                continue
            stamps.append(int(row[0]))
            files.append(folder / "data" / row[1].strip())
    return EurocCamera(cam, t_bs, np.asarray(stamps, np.int64), tuple(files))


class GroundTruth:
    """World-from-body poses of the sequence, looked up at a stamp (nearest sample within
    ``tolerance_ns``; EuRoC's ground truth is sampled with the camera stamps here)."""

    def __init__(self, path: Path) -> None:
        from scipy.spatial.transform import Rotation

        rows = []
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if row and not row[0].startswith("#"):
                    rows.append([float(v) for v in row[:8]])
        arr = np.asarray(rows)
        self.stamps = arr[:, 0].astype(np.int64)
        self.positions = arr[:, 1:4]
        # file order: qw qx qy qz
        self.rotations = Rotation.from_quat(arr[:, [5, 6, 7, 4]]).as_matrix()

    def world_from_body(self, stamp_ns: int, tolerance_ns: int = 2_000_000) -> Optional[np.ndarray]:
        i = int(np.searchsorted(self.stamps, stamp_ns))
        best = None
        for j in (i - 1, i):
            if 0 <= j < len(self.stamps) and abs(int(self.stamps[j]) - stamp_ns) <= tolerance_ns:
                if best is None or abs(int(self.stamps[j]) - stamp_ns) < \
                        abs(int(self.stamps[best]) - stamp_ns):
                    best = j
        if best is None:
            return None
        t = np.eye(4)
        t[:3, :3] = self.rotations[best]
        t[:3, 3] = self.positions[best]
        return t


@dataclass(frozen=True)
class EurocSequence:
    cam0: EurocCamera
    cam1: EurocCamera
    ground_truth: Optional[GroundTruth]

    def relative(self, a: EurocCamera, ia: int, b: EurocCamera, ib: int) -> Optional[np.ndarray]:
        """4x4 pose of camera ``b`` at frame ``ib`` in the frame of camera ``a`` at ``ia``
        (X_a = T X_b), from the extrinsics and the ground truth."""
        if self.ground_truth is None:
            return None
        wa = self.ground_truth.world_from_body(int(a.stamps_ns[ia]))
        wb = self.ground_truth.world_from_body(int(b.stamps_ns[ib]))
        if wa is None or wb is None:
            return None
        return np.linalg.inv(wa @ a.body_from_camera) @ (wb @ b.body_from_camera)

    def right_index(self, left_index: int) -> Optional[int]:
        """Index of the cam1 frame taken with cam0 frame ``left_index`` (same stamp; the two
        folders need not hold the same frames), None when cam1 has none."""
        stamp = self.cam0.stamps_ns[left_index]
        hit = np.flatnonzero(self.cam1.stamps_ns == stamp)
        return int(hit[0]) if len(hit) else None

    def stereo_extrinsic(self) -> np.ndarray:
        """cam1 in the cam0 frame (X_cam0 = T X_cam1), from the calibration alone."""
        return np.linalg.inv(self.cam0.body_from_camera) @ self.cam1.body_from_camera


def load_euroc(root: Path) -> EurocSequence:
    """The sequence in ``root`` (``mav0/`` and optionally ``groundtruth/*.csv``)."""
    root = Path(root)
    if not (root / "mav0" / "cam0" / "sensor.yaml").is_file():
        raise InputError(f"{root} is not an EuRoC ASL folder (mav0/cam0/sensor.yaml missing)")
    gt_files = sorted((root / "groundtruth").glob("*.csv")) if (root / "groundtruth").is_dir() \
        else []
    gt_path = gt_files[0] if gt_files else root / "mav0" / "state_groundtruth_estimate0" / \
        "data.csv"
    gt = GroundTruth(gt_path) if gt_path.is_file() else None
    return EurocSequence(read_camera(root, "cam0"), read_camera(root, "cam1"), gt)
