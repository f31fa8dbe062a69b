"""The degeneracy probe: distinct images must give distinct descriptors.

Why: weights can be finite, of the right shapes, load cleanly and still be useless. Weights that
map every image to the same descriptor (a collapsed training run, an aggregator exponent edited
to +Inf, a layer of zeros) pass a parity check against PyTorch (both sides agree on the constant)
and a fingerprint check; a map built with them matches everything to everything, and a
relocalizer refuses the map as if model and map did not belong together. The probe runs at every
model load (the runtime's ``load_encoder``, hence the node's configure, ``vpr map build``,
evaluation) and in ``vpr export onnx``'s verification: two synthetic images with nothing in
common (seeded noise; smooth colour ramps with a checkerboard), encoded one at a time (so
engines built for batch 1 can run it), must come out with a cosine below
:data:`MAX_PROBE_COSINE`. Its cost is two single-image forward passes at the model's input size.
"""

from __future__ import annotations

import numpy as np

from vpr_ros.errors import ModelError

#: Two descriptors closer than this are "the same". Healthy models, random heads included, put
#: the two probe images far below it (docs/reliability.md lists the values measured); the
#: collapsed GeM of the reported case gave 0.999998.
MAX_PROBE_COSINE = 0.9999


def probe_images(size: tuple[int, int]) -> list[np.ndarray]:
    """Two HxWx3 uint8 RGB images that share no structure, at ``size`` (H, W)."""
    h, w = int(size[0]), int(size[1])
    noise = np.random.default_rng(20261122).integers(0, 256, (h, w, 3), dtype=np.uint8)
    y, x = np.mgrid[0:h, 0:w]
    ramp = np.stack([255 * x / max(1, w - 1), 255 * y / max(1, h - 1),
                     255 * (1 - x / max(1, w - 1))], axis=-1)
    checker = ((y // max(1, h // 8) + x // max(1, w // 8)) % 2)[..., None] * 96
    pattern = np.clip(ramp * 0.6 + checker, 0, 255).astype(np.uint8)
    return [noise, pattern]


def check_distinct(descriptors: np.ndarray, source: str) -> None:
    """ModelError unless the probe images' descriptors (rows) are finite and pairwise distinct."""
    d = np.asarray(descriptors, dtype=np.float64)
    if not np.isfinite(d).all():
        raise ModelError(f"{source}: gives NaN/Inf descriptors for the probe images; the weights "
                         "are corrupt (or training diverged): use another checkpoint")
    norms = np.linalg.norm(d, axis=1)
    if (norms < 1e-12).any():
        raise ModelError(f"{source}: gives all-zero descriptors for the probe images; the "
                         "weights are degenerate: use another checkpoint")
    unit = d / norms[:, None]
    cos = unit @ unit.T
    worst = float(np.max(cos[~np.eye(len(d), dtype=bool)])) if len(d) > 1 else -1.0
    if worst > MAX_PROBE_COSINE:
        raise ModelError(f"{source}: gives the same descriptor for images that share nothing "
                         f"(cosine {worst:.6f} > {MAX_PROBE_COSINE}); the weights are degenerate "
                         "(collapsed training, or an edited or corrupt weight file): use another "
                         "checkpoint")


def probe_model(model, source: str) -> None:
    """The probe on a PyTorch :class:`~vpr_ros.models.vpr_model.VPRModel` just loaded from
    disk (images normalised as its config says; eval mode, no gradients, the model's mode
    restored). ModelError when it fails or is degenerate."""
    import torch

    cfg = model.config.input
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for img in probe_images(cfg.size):
                x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255.0)
                out.append(model((x - mean) / std).float().numpy())
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
        raise ModelError(f"{source}: fails on a valid {cfg.size[0]}x{cfg.size[1]} image "
                         f"({type(exc).__name__}: {first[:200]}); the model directory is "
                         "inconsistent: re-create it") from exc
    finally:
        model.train(was_training)
    check_distinct(np.concatenate(out), source)


def probe_cosine(descriptors: np.ndarray) -> float:
    """The probe images' cosine (for reports and tests)."""
    d = np.asarray(descriptors, dtype=np.float64)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    return float(d[0] @ d[1])
