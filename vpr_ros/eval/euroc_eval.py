"""``vpr eval euroc``: the verifier's metric accuracy on real calibrated frames with ground truth.

On EuRoC's V1_01_easy stereo frames (:mod:`vpr_ros.datasets.euroc`), for every keypoint kind x
estimator asked for:

- essential matrix: the right camera's frame j against the left camera's frame i (i = j, the
  stereo pair, and |i - j| = 24 frames), rotation error and translation-direction error
  against the calibrated extrinsic composed with the ground-truth body motion; and how well
  the covariance predicts the rotation error (the median of sqrt(e^T C^-1 e / 3), about 0.89
  for a right covariance);
- PnP: 3-D points triangulated from the stereo pair of frame i, the right camera's frame j as
  the query: translation and rotation error of the metric pose.

Frames are sampled every ``step`` frames. The micro sequence is the first 95 frames of the
sequence, where the MAV stands on the ground: the stereo pair gives the baseline, the ground
truth the (small) motion between frames.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vpr_ros.datasets import euroc
from vpr_ros.datasets.public_data import find_dataset, missing_reason
from vpr_ros.errors import InputError
from vpr_ros.localization.verification import GeometricVerifier, VerificationConfig, View
from vpr_ros.mapdb.keypoint_depth import points_from_stereo
from vpr_ros.mapdb.transforms import matrix_to_rotvec
from vpr_ros.runtime.local_features import FeatureExtractor, LocalFeatures


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        return {"median": float("nan"), "p90": float("nan"), "max": float("nan")}
    return {"median": round(float(np.median(a)), 4), "p90": round(float(np.percentile(a, 90)), 4),
            "max": round(float(a.max()), 4)}


def evaluate_euroc(kinds: Sequence[str] = ("sift",), estimators: Sequence[str] = ("poselib",),
                   step: int = 8, gap: int = 24, sift_contrast: float = 0.02,
                   equalize: bool = False, extract_scale: float = 1.0) -> dict[str, Any]:
    """Verifier accuracy on EuRoC pairs. ``extract_scale`` < 1: the query frames (right
    camera) are shrunk before extraction, as ``verification.extract_scale`` does in the node,
    while keyframes (left camera, and the stereo points) stay at full resolution, as a map
    built offline has them."""
    root = find_dataset(euroc.NAME)
    if root is None:
        raise InputError(missing_reason(euroc.NAME, euroc.SOURCE))
    seq = euroc.load_euroc(root)
    frames = list(range(0, len(seq.cam0.files), step))
    ext_lr = seq.stereo_extrinsic()
    rows = []
    for kind in kinds:
        ext = FeatureExtractor(kind, 1000, equalize=equalize, sift_contrast=sift_contrast)
        f0 = {i: ext.extract(seq.cam0.image(i)) for i in frames}
        f1 = {i: ext.extract(seq.cam1.image(seq.right_index(i))) for i in frames}
        fq = f1
        if extract_scale != 1.0:
            small = FeatureExtractor(kind, 1000, equalize=equalize, sift_contrast=sift_contrast,
                                     scale=extract_scale)
            fq = {i: small.extract(seq.cam1.image(seq.right_index(i))) for i in frames}
        pts = {i: points_from_stereo(f0[i], f1[i], seq.cam0.model, seq.cam1.model, ext_lr)
               for i in frames[::2]}
        for est in estimators:
            v = GeometricVerifier(VerificationConfig(estimator=est))
            rot, direction, z, verified, n = [], [], [], 0, 0
            for i in frames:
                for j in frames:
                    if i != j and abs(i - j) != gap:
                        continue
                    r = v.verify_pair(View(fq[j], seq.cam1.model), View(f0[i], seq.cam0.model))
                    n += 1
                    verified += int(r.verified)
                    if r.pose is None:
                        continue
                    truth = seq.relative(seq.cam0, i, seq.cam1, seq.right_index(j))
                    e = matrix_to_rotvec(r.pose.rotation_matrix @ truth[:3, :3].T)
                    rot.append(float(np.degrees(np.linalg.norm(e))))
                    t = np.asarray(r.pose.translation)
                    tg = truth[:3, 3] / np.linalg.norm(truth[:3, 3])
                    direction.append(float(np.degrees(np.arccos(np.clip(t @ tg, -1, 1)))))
                    cov = np.asarray(r.pose.covariance).reshape(6, 6)[3:, 3:]
                    z.append(float(np.sqrt(e @ np.linalg.solve(cov, e) / 3)))
            pnp_t, pnp_r, pnp_n = [], [], 0
            for i, p in pts.items():
                keyframe = View(LocalFeatures(kind, f0[i].xy, f0[i].descriptors, p),
                                seq.cam0.model)
                for j in frames:
                    if j == i:
                        continue
                    r = v.verify_pair(View(fq[j], seq.cam1.model), keyframe)
                    pnp_n += 1
                    if not (r.verified and r.pose is not None and r.pose.metric):
                        continue
                    truth = seq.relative(seq.cam0, i, seq.cam1, seq.right_index(j))
                    pnp_t.append(float(np.linalg.norm(np.asarray(r.pose.translation)
                                                      - truth[:3, 3])))
                    pnp_r.append(float(np.degrees(np.linalg.norm(matrix_to_rotvec(
                        r.pose.rotation_matrix @ truth[:3, :3].T)))))
            rows.append({
                "kind": kind, "estimator": est,
                "essential": {"pairs": n, "verified": verified, "rotation_deg": _stats(rot),
                              "direction_deg": _stats(direction),
                              "rotation_normalised_error_median":
                                  round(float(np.median(z)), 3) if z else None},
                "pnp": {"pairs": pnp_n, "verified_metric": len(pnp_t),
                        "translation_m": _stats(pnp_t), "rotation_deg": _stats(pnp_r)}})
    return {"data": str(root), "frames": len(frames), "step": step, "gap": gap,
            "sift_contrast": sift_contrast, "equalize": equalize, "extract_scale": extract_scale,
            "baseline_m": round(float(np.linalg.norm(ext_lr[:3, 3])), 4), "rows": rows}


def format_table(res: dict[str, Any]) -> str:
    lines = [f"EuRoC V1_01_easy micro ({res['frames']} frames every {res['step']}, pairs i = j "
             f"and |i - j| = {res['gap']}; stereo baseline {res['baseline_m']} m)",
             "| kind | estimator | E verified | E rotation deg med / p90 / max | E direction deg "
             "med / p90 / max | cov. check | PnP verified | PnP translation m med / max | "
             "PnP rotation deg med / max |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        e, p = r["essential"], r["pnp"]
        lines.append(
            f"| {r['kind']} | {r['estimator']} | {e['verified']}/{e['pairs']} | "
            f"{e['rotation_deg']['median']:.3f} / {e['rotation_deg']['p90']:.3f} / "
            f"{e['rotation_deg']['max']:.3f} | {e['direction_deg']['median']:.2f} / "
            f"{e['direction_deg']['p90']:.2f} / {e['direction_deg']['max']:.2f} | "
            f"{e['rotation_normalised_error_median']} | {p['verified_metric']}/{p['pairs']} | "
            f"{p['translation_m']['median']:.4f} / {p['translation_m']['max']:.4f} | "
            f"{p['rotation_deg']['median']:.3f} / {p['rotation_deg']['max']:.3f} |")
    return "\n".join(lines)
