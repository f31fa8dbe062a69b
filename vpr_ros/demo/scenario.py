"""A small rendered world for the demo and the end-to-end tests.

A camera car drives twice around a city block. Buildings line both sides of the road, each with
its own procedural facade (colour, window grid, sign band, height), so places are recognisable
the way real streets are: by structure, not by pixel noise. Frames are rendered by ray casting a
2-D map of facade segments (one ray per image column, pinhole projection of wall heights).

Lap 2 is the "revisit": different lighting (dusk: darker, warmer, lit windows), haze that grows
with distance, a lateral offset in the lane and a different speed, so the two laps never share
a frame and a place recogniser has to generalise across appearance. Ground-truth poses come with
every frame; the recorded odometry drifts away from them (:mod:`vpr_ros.demo.drift`), so the
demo can show what loop closures do to a trajectory.

The camera is an ideal pinhole (:func:`camera_matrix`, no distortion) mounted 1.6 m above the
robot's base looking forward (:func:`camera_mount`), and every frame comes with its registered
depth image, as from an RGB-D camera: what geometric verification needs for a metric pose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class ScenarioConfig:
    block_length_m: float = 60.0      # the loop road is a rounded rectangle
    block_width_m: float = 40.0
    corner_radius_m: float = 6.0
    street_half_width_m: float = 7.0  # facades stand this far from the road centre line
    image_size: tuple[int, int] = (480, 640)  # (H, W): a common robot camera mode
    fov_deg: float = 90.0
    camera_height_m: float = 1.6
    rate_hz: float = 5.0
    lap1_speed_mps: float = 4.0
    lap2_speed_mps: float = 3.4
    lap2_lateral_offset_m: float = 0.8
    seed: int = 7


@dataclass
class Frame:
    """One camera frame with its ground-truth pose (map frame, metres / radians)."""

    lap: int
    stamp_ns: int
    x: float
    y: float
    yaw: float
    image: np.ndarray = field(repr=False)
    depth: np.ndarray | None = field(default=None, repr=False)  # metres along the optical axis

    @property
    def quaternion(self) -> tuple[float, float, float, float]:
        return (0.0, 0.0, math.sin(self.yaw / 2), math.cos(self.yaw / 2))


class Route:
    """Centre line of the loop road, parametrised by arc length (counter-clockwise)."""

    def __init__(self, cfg: ScenarioConfig) -> None:
        r, a, b = cfg.corner_radius_m, cfg.block_length_m, cfg.block_width_m
        self.r, self.a, self.b = r, a, b
        sa, sb, arc = a - 2 * r, b - 2 * r, math.pi * r / 2
        # (kind, length, start point / centre, start heading)
        self.pieces = [("line", sa, (r, 0.0), 0.0), ("arc", arc, (a - r, r), -math.pi / 2),
                       ("line", sb, (a, r), math.pi / 2), ("arc", arc, (a - r, b - r), 0.0),
                       ("line", sa, (a - r, b), math.pi), ("arc", arc, (r, b - r), math.pi / 2),
                       ("line", sb, (0.0, b - r), -math.pi / 2), ("arc", arc, (r, r), math.pi)]
        self.length = sum(p[1] for p in self.pieces)

    def pose(self, s: float, lateral: float = 0.0) -> tuple[float, float, float]:
        """(x, y, yaw) at arc length ``s``; ``lateral`` > 0 shifts to the right of travel."""
        s %= self.length
        for kind, length, p0, h0 in self.pieces:
            if s <= length:
                break
            s -= length
        if kind == "line":
            x, y, yaw = p0[0] + s * math.cos(h0), p0[1] + s * math.sin(h0), h0
        else:  # h0 is the angle of the start point seen from the arc centre
            ang = h0 + s / self.r
            x, y = p0[0] + self.r * math.cos(ang), p0[1] + self.r * math.sin(ang)
            yaw = ang + math.pi / 2
        return x + lateral * math.sin(yaw), y - lateral * math.cos(yaw), yaw


class World:
    """Facade segments around the loop and their procedural textures."""

    def __init__(self, cfg: ScenarioConfig) -> None:
        rng = np.random.default_rng(cfg.seed)
        d = cfg.street_half_width_m
        a, b = cfg.block_length_m, cfg.block_width_m
        segs: list[tuple[float, float, float, float]] = []
        # outer ring (outset rectangle) and inner block (inset rectangle), split into buildings
        for (x0, y0, x1, y1) in [(-d, -d, a + d, a + d), (d, d, a - d, b - d)]:
            y1 = b + d if x0 < 0 else y1
            corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
            for (px, py), (qx, qy) in zip(corners[:-1], corners[1:]):
                length = math.hypot(qx - px, qy - py)
                pos = 0.0
                while pos < length - 1.0:
                    w = float(rng.uniform(4.0, 10.0))
                    end = min(length, pos + w)
                    f0, f1 = pos / length, end / length
                    segs.append((px + f0 * (qx - px), py + f0 * (qy - py),
                                 px + f1 * (qx - px), py + f1 * (qy - py)))
                    pos = end + float(rng.uniform(0.0, 2.5))  # alleys between buildings
        self.seg = np.array(segs, dtype=np.float64)
        n = len(segs)
        hsv = np.stack([rng.uniform(0, 1, n), rng.uniform(0.15, 0.7, n),
                        rng.uniform(0.45, 0.95, n)], 1)
        self.color = _hsv_to_rgb(hsv)
        self.height = rng.uniform(4.0, 14.0, n)
        self.win_du = rng.uniform(1.2, 3.5, n)        # window spacing along the facade
        self.win_dv = rng.uniform(2.2, 3.5, n)        # floor height
        self.win_fill = rng.uniform(0.3, 0.7, n)      # window width fraction
        self.sign_v = rng.uniform(1.0, 3.0, n)        # sign band height above ground
        self.sign_on = rng.uniform(0, 1, n) < 0.5
        self.sign_color = _hsv_to_rgb(np.stack([rng.uniform(0, 1, n), np.full(n, 0.9),
                                                np.full(n, 0.95)], 1))
        self.lit = rng.uniform(0, 1, (n, 64)) < 0.45  # which windows glow at dusk
        # facade style: 0 plain window grid, 1 pilasters (vertical stripes), 2 horizontal
        # bands, 3 a diagonal mural at street level; second colour for stripes and murals
        self.style = rng.integers(0, 4, n)
        self.accent = _hsv_to_rgb(np.stack([rng.uniform(0, 1, n), rng.uniform(0.5, 1.0, n),
                                             rng.uniform(0.3, 0.9, n)], 1))
        self.stripe = rng.uniform(0.5, 2.0, n)        # stripe / band period (m)

    def cast(self, x: float, y: float, angles: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest facade hit per ray: (distance, segment id or -1, metres along facade)."""
        dx, dy = np.cos(angles)[:, None], np.sin(angles)[:, None]
        p = self.seg[None, :, :2]
        e = self.seg[None, :, 2:] - p
        ex, ey = e[..., 0], e[..., 1]
        wx, wy = p[..., 0] - x, p[..., 1] - y
        den = dx * ey - dy * ex
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (wx * ey - wy * ex) / den
            u = (wx * dy - wy * dx) / den
        ok = (np.abs(den) > 1e-12) & (t > 0.05) & (u >= 0) & (u <= 1)
        t = np.where(ok, t, np.inf)
        idx = t.argmin(axis=1)
        dist = t[np.arange(len(angles)), idx]
        hit = np.isfinite(dist)
        along = u[np.arange(len(angles)), idx] * np.hypot(ex[0, idx], ey[0, idx])
        return dist, np.where(hit, idx, -1), along


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[:, 0] * 6, hsv[:, 1], hsv[:, 2]
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, 1) for c in
                      [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])
    return table[i, np.arange(len(i))]


def camera_matrix(cfg: ScenarioConfig) -> tuple[float, ...]:
    """K (row-major 3x3) of the rendered camera: an ideal pinhole whose pixel (u, v) centre
    looks along ((u + 0.5 - W/2) / f, (v + 0.5 - H/2) / f, 1) in the optical frame (x right,
    y down, z forward), i.e. OpenCV's convention with c = size / 2 - 0.5."""
    h, w = cfg.image_size
    f = (w / 2) / math.tan(math.radians(cfg.fov_deg) / 2)
    return (f, 0.0, w / 2 - 0.5, 0.0, f, h / 2 - 0.5, 0.0, 0.0, 1.0)


#: The camera optical frame in base_link (x forward, y left, z up): optical z = base x,
#: optical x = -base y, optical y = -base z; mounted ``camera_height_m`` above the base.
MOUNT_QUATERNION = (-0.5, 0.5, -0.5, 0.5)


def camera_mount(cfg: ScenarioConfig) -> tuple[float, ...]:
    """(tx, ty, tz, qx, qy, qz, qw) of the optical frame in base_link."""
    return (0.0, 0.0, cfg.camera_height_m, *MOUNT_QUATERNION)


def render(world: World, cfg: ScenarioConfig, x: float, y: float, yaw: float, lap: int
           ) -> np.ndarray:
    """Render one RGB uint8 frame from pose (x, y, yaw) with the lap's lighting."""
    return render_with_depth(world, cfg, x, y, yaw, lap)[0]


def render_with_depth(world: World, cfg: ScenarioConfig, x: float, y: float, yaw: float,
                      lap: int) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 frame and its depth along the optical axis (float32 metres, NaN for the
    sky): the registered depth image an RGB-D camera would give."""
    h, w = cfg.image_size
    f = (w / 2) / math.tan(math.radians(cfg.fov_deg) / 2)
    cols = np.arange(w) + 0.5 - w / 2
    angles = yaw - np.arctan(cols / f)
    dist, seg, along = world.cast(x, y, angles)
    perp = dist * np.cos(np.arctan(cols / f))           # no fish-eye
    rows = (np.arange(h) + 0.5 - h / 2)[:, None]         # +down
    cam_h = cfg.camera_height_m
    with np.errstate(divide="ignore", invalid="ignore"):
        height_at_row = cam_h - rows * perp[None, :] / f  # metres above ground seen by a pixel
    # columns that hit nothing look at sky/road only: give them a harmless height
    height_at_row = np.nan_to_num(height_at_row, nan=-1.0, posinf=-1.0, neginf=-1.0)
    segc = np.maximum(seg, 0)
    top = world.height[segc][None, :]
    wall = (seg[None, :] >= 0) & (height_at_row >= 0) & (height_at_row <= top)
    # facade texture: base colour, window grid, optional sign band
    v = height_at_row
    du, dv = world.win_du[segc][None, :], world.win_dv[segc][None, :]
    fu = (along[None, :] / du) % 1.0
    fv = (v / dv) % 1.0
    window = (fu < world.win_fill[segc][None, :]) & (fv > 0.35) & (fv < 0.8) & (v > 2.0)
    sign = world.sign_on[segc][None, :] & (np.abs(v - world.sign_v[segc][None, :]) < 0.35)
    img = np.broadcast_to(world.color[segc][None, :, :], (h, w, 3)).copy()
    style = world.style[segc][None, :]
    period = world.stripe[segc][None, :]
    accent_px = np.broadcast_to(world.accent[segc][None, :, :], (h, w, 3))
    pattern = (((style == 1) & ((along[None, :] / period) % 1.0 < 0.3))
               | ((style == 2) & ((v / period) % 1.0 < 0.35))
               | ((style == 3) & (v < 3.0) & (((along[None, :] + v) / period) % 1.0 < 0.5)))
    pattern &= wall
    img[pattern] = accent_px[pattern]
    img[window] = (0.12, 0.16, 0.22)
    if lap == 2:  # dusk: some windows glow
        win_id = (np.floor(along[None, :] / du) + 7 * np.floor(v / dv)).astype(int) % 64
        glow = window & world.lit[segc[None, :].repeat(h, 0), win_id]
        img[glow] = (1.0, 0.85, 0.45)
    img[sign] = np.broadcast_to(world.sign_color[segc][None, :, :], (h, w, 3))[sign]
    # sky and road
    sky = ~wall & (rows < 0)
    ground = ~wall & ~sky
    t_sky = np.clip(-rows / (h / 2), 0, 1)
    sky_top, sky_low = ((0.35, 0.55, 0.9), (0.75, 0.85, 0.95)) if lap == 1 else \
        ((0.2, 0.2, 0.4), (0.85, 0.5, 0.35))
    sky_rgb = np.asarray(sky_low) + t_sky[..., None] * (np.asarray(sky_top) - sky_low)
    img[sky] = np.broadcast_to(sky_rgb, (h, w, 3))[sky]
    with np.errstate(divide="ignore"):
        ground_d = np.where(rows > 0, cam_h * f / np.maximum(rows, 1e-6), np.inf)
    road = 0.35 + 0.1 * np.exp(-ground_d / 20.0)
    img[ground] = np.broadcast_to(np.repeat(road[..., None], 3, -1), (h, w, 3))[ground]
    # lighting of the lap
    depth = np.where(wall, perp[None, :], np.where(ground, ground_d, 200.0))
    metric = np.where(wall | ground, depth, np.nan).astype(np.float32)
    if lap == 1:
        img = img * (0.85 + 0.15 * np.exp(-depth / 40.0))[..., None]
    else:
        img = img * np.asarray((0.75, 0.6, 0.55))
        haze = 1.0 - np.exp(-np.minimum(depth, 200.0) / 30.0)
        img = img * (1 - haze[..., None] * 0.6) + haze[..., None] * 0.6 * np.asarray(
            (0.55, 0.45, 0.45))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), metric


def poses(cfg: ScenarioConfig = ScenarioConfig(), start_ns: int = 1_700_000_000_000_000_000
          ) -> Iterator[tuple[int, int, float, float, float]]:
    """(lap, stamp_ns, x, y, yaw) of every frame of both laps, in time order, without
    rendering (ground truth for trajectory tests)."""
    route = Route(cfg)
    dt_ns = int(round(1e9 / cfg.rate_hz))
    stamp = start_ns
    for lap, speed, lateral in ((1, cfg.lap1_speed_mps, 0.0),
                                (2, cfg.lap2_speed_mps, cfg.lap2_lateral_offset_m)):
        n = int(route.length / (speed / cfg.rate_hz))
        for i in range(n):
            x, y, yaw = route.pose(i * speed / cfg.rate_hz, lateral)
            yield lap, stamp, x, y, yaw
            stamp += dt_ns


def drive(cfg: ScenarioConfig = ScenarioConfig(), start_ns: int = 1_700_000_000_000_000_000
          ) -> Iterator[Frame]:
    """Both laps, in time order: lap 1 then lap 2 right after it."""
    world = World(cfg)
    for lap, stamp, x, y, yaw in poses(cfg, start_ns):
        rgb, depth = render_with_depth(world, cfg, x, y, yaw, lap)
        yield Frame(lap, stamp, x, y, yaw, rgb, depth)
