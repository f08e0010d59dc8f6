"""Synthetic aerial-like land-cover scenes, generated in memory: :func:`generate_scene`.

Real imagery cannot ship with the package, yet the demo must train a model that learns
something and the pipeline must be exercised on scenes of any size. A scene is drawn in two
steps from one seed:

1. **Layout** (seeded ``np.random.default_rng``): smooth noise fields thresholded into water
   bodies and vegetation patches, a few straight or gently curved roads of constant width, and
   rotated rectangular buildings (clustered in settlements and along roads, never on water or
   roads). Thresholds are quantiles of the fields sampled over the whole scene, so every scene
   has a realistic class imbalance (roughly bare soil 45 %, vegetation 28 %, water 12 %,
   buildings 8 %, roads 5 %).
2. **Rendering**: a colour and a texture per class that a small CNN can tell apart within
   ~30 px (water: dark blue with fine ripples; vegetation: green, blobby canopy; buildings:
   red or grey gabled roofs with a bright edge and a cast shadow; roads: grey asphalt with lane
   lines; bare soil: brown with grain), then a mild illumination gradient and sensor noise.

This module owns the classes (:data:`CLASSES`, :data:`CLASS_COLORS`), the layout and the
rendering (:class:`Scene`). Every field is a function of absolute pixel coordinates
(:mod:`segpipe.train.synthetic_noise`), so a scene is rendered strip by strip with bounded
memory and any strip height gives the same pixels; temporaries are float32.
:mod:`segpipe.train.synthetic` writes scenes as GeoTIFF files and training datasets.

Glossary: *scene* = one generated image with its label map; *strip* = a band of full-width
rows rendered at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from segpipe.core.errors import ConfigError
from segpipe.train.synthetic_noise import hash_coords, noise_grid, seeded_field, seeded_key, uniform

#: class names; the index is the class id written in masks
CLASSES: tuple[str, ...] = ("bare_soil", "water", "vegetation", "building", "road")
#: display colours of the classes (masks, reports)
CLASS_COLORS: tuple[str, ...] = ("#c8a26e", "#1f77b4", "#2ca02c", "#d62728", "#7f7f7f")
BARE_SOIL, WATER, VEGETATION, BUILDING, ROAD = range(5)
#: rows rendered at once by default (memory: ~30 float32 arrays of STRIP_ROWS × width)
STRIP_ROWS = 256

# target shares of the scene (before roads and buildings cover part of the ground)
_WATER_SHARE = 0.12
_VEGETATION_SHARE = 0.34
_BUILDING_SHARE = 0.08
#: mean distance between parallel roads, px (≈ 4–5 % roads at widths of 11–17 px)
_ROAD_SPACING = 700.0
#: building candidates sit on a jittered grid of this pitch, px (no overlaps by construction)
_BUILDING_PITCH = 56.0

# per-class colour ranges (RGB): the texture mixes between the two
_C1 = np.array([[140, 108, 76], [18, 42, 80], [32, 70, 28], [0, 0, 0], [78, 78, 84]], dtype=np.float32)
_C2 = np.array([[188, 160, 118], [36, 76, 112], [92, 138, 52], [0, 0, 0], [112, 112, 116]], dtype=np.float32)
_ROOFS = np.array([[168, 72, 52], [178, 176, 172], [96, 98, 110]], dtype=np.float32)  # red tiles, light, slate
_PAINT = np.array([226, 226, 214], dtype=np.float32)


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Road:
    """A road of constant width along a gently curved centre line.

    A vertical road's centre is ``x = c(y)``, a horizontal one's ``y = c(x)``, with
    ``c(t) = mid + slope·(t − t_mid) + amp·sin(2πt/period + phase)``. The signed distance to the
    centre is ``(across − c(t)) / sqrt(1 + c'(t)²)``, exact for straight roads and within a
    fraction of a pixel for these gentle curves.
    """

    vertical: bool
    mid: float
    t_mid: float
    slope: float
    amp: float
    period: float
    phase: float
    half_width: float

    def centre(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = 2 * math.pi / self.period
        t = np.asarray(t, dtype=np.float64)
        c = self.mid + self.slope * (t - self.t_mid) + self.amp * np.sin(w * t + self.phase)
        dc = self.slope + self.amp * w * np.cos(w * t + self.phase)
        return c, dc

    def signed_distance(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        along, across = (ys, xs) if self.vertical else (xs, ys)
        c, dc = self.centre(along)
        return (across - c) / np.sqrt(1 + dc * dc)

    def angle(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Direction of the road (radians, image x/y axes) at the given points."""
        _, dc = self.centre(ys if self.vertical else xs)
        return np.arctan2(1.0, dc) if self.vertical else np.arctan2(dc, 1.0)


@dataclass(frozen=True)
class _Buildings:
    """Rotated rectangles sorted by centre row: centre, half sides along/across ``theta``, roof."""

    cy: np.ndarray
    cx: np.ndarray
    half_u: np.ndarray
    half_v: np.ndarray
    theta: np.ndarray
    roof: np.ndarray  #: index into _ROOFS

    @property
    def radius(self) -> np.ndarray:
        return np.hypot(self.half_u, self.half_v)


class Scene:
    """The layout of one scene (small: fields are functions, roads and buildings are lists)."""

    def __init__(self, height: int, width: int, seed: int) -> None:
        self.height, self.width, self.seed = height, width, seed
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E6]))
        self.water = seeded_field(seed, "water", (512, 256, 128, 64), (1.0, 0.5, 0.25, 0.12))
        self.vegetation = seeded_field(seed, "vegetation", (192, 96, 48, 24), (1.0, 0.6, 0.35, 0.2))
        self.settlement = seeded_field(seed, "settlement", (320, 160), (1.0, 0.5))
        self.keys = {name: seeded_key(seed, name) for name in (
            "grain", "sensor", "soil_a", "soil_b", "soil_c", "water_depth", "water_warp",
            "canopy_a", "canopy_b", "canopy_tone", "asphalt", "haze")}
        self.ripple_angle = float(rng.uniform(0, math.pi))
        self.illum_angle = float(rng.uniform(0, 2 * math.pi))
        self.illum_strength = float(rng.uniform(0.05, 0.10))
        sun = float(rng.uniform(math.radians(20), math.radians(70)))
        length = float(rng.uniform(3.5, 6.0))
        self.shadow = (length * math.sin(sun), length * math.cos(sun))  # (dy, dx): sun from the upper left

        # thresholds = quantiles over a subsample of the whole scene: the same for every strip
        step = max(1, math.ceil(max(height, width) / 256))
        rows, cols = np.arange(step // 2, height, step), np.arange(step // 2, width, step)
        w = self.water.grid(rows, cols)
        self.water_level = float(np.quantile(w, 1 - _WATER_SHARE))
        land = self.vegetation.grid(rows, cols)[w <= self.water_level]
        share = _VEGETATION_SHARE / max(land.size / w.size, 1e-6)
        self.vegetation_level = float(np.quantile(land, min(max(1 - share, 0.0), 1.0))) if land.size else 1.0

        self.roads = self._make_roads(rng)
        self.buildings = self._make_buildings(rng)

    # -- layout ------------------------------------------------------------------------------
    def _make_roads(self, rng: np.random.Generator) -> list[_Road]:
        h, w = self.height, self.width
        # stochastic rounding keeps the expected road share independent of the scene size
        n_vertical = int(w / _ROAD_SPACING + rng.random())
        n_horizontal = int(h / _ROAD_SPACING + rng.random())
        if n_vertical + n_horizontal == 0 and max(h, w) >= 512:
            n_vertical, n_horizontal = (1, 0) if w >= h else (0, 1)
        roads = []
        for vertical, n in ((True, n_vertical), (False, n_horizontal)):
            length, extent = (h, w) if vertical else (w, h)
            for _ in range(n):
                curved = rng.random() < 0.5
                roads.append(_Road(
                    vertical=vertical,
                    mid=float(rng.uniform(0.1, 0.9) * extent),
                    t_mid=length / 2,
                    slope=float(rng.normal(0, 0.12)),
                    amp=float(rng.uniform(10, 10 + 0.05 * length)) if curved else 0.0,
                    period=float(rng.uniform(0.8, 2.0) * max(length, 256)),
                    phase=float(rng.uniform(0, 2 * math.pi)),
                    half_width=float(rng.uniform(5.5, 8.5)),
                ))
        return roads

    def _make_buildings(self, rng: np.random.Generator) -> _Buildings:
        h, w, pitch = self.height, self.width, _BUILDING_PITCH
        gy, gx = np.meshgrid(np.arange(pitch / 2, h, pitch), np.arange(pitch / 2, w, pitch), indexing="ij")
        cy, cx = gy.ravel(), gx.ravel()
        n = cy.size
        half_u = rng.uniform(9.0, 19.0, n)
        half_v = rng.uniform(7.0, np.minimum(half_u, 15.0))
        radius = np.hypot(half_u, half_v)
        jitter = np.maximum(pitch / 2 - radius - 1, 0)
        cy = cy + rng.uniform(-1, 1, n) * jitter
        cx = cx + rng.uniform(-1, 1, n) * jitter
        theta = rng.uniform(0, math.pi, n)
        roof = rng.choice(len(_ROOFS), size=n, p=[0.5, 0.35, 0.15])
        ok = (cy < h) & (cx < w)

        near = np.zeros(n, dtype=bool)
        if self.roads:
            dist = np.stack([np.abs(r.signed_distance(cy, cx)) - r.half_width for r in self.roads])
            ok &= (dist > radius + 3).all(axis=0)
            nearest = dist.argmin(axis=0)
            near = dist.min(axis=0) < radius + 60
            road_angle = np.choose(nearest, [r.angle(cy, cx) for r in self.roads])
            theta = np.where(near, road_angle + rng.normal(0, 0.04, n), theta)
        # no corner (nor the centre) in water, with a small margin
        cu, su = np.cos(theta), np.sin(theta)
        for du, dv in ((0, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
            py = cy + du * half_u * su + dv * half_v * cu
            px = cx + du * half_u * cu - dv * half_v * su
            ok &= self.water.points(py, px) < self.water_level - 0.01

        # weighted sampling without replacement (Efraimidis–Spirakis) until the target area:
        # settlements and roadsides fill first, a few farms stand alone
        weight = 0.05 + 12.0 * self.settlement.points(cy, cx) ** 4 + 3.0 * near
        order = np.argsort(-(rng.random(n) ** (1.0 / weight)))
        order = order[ok[order]]
        area = 4 * half_u[order] * half_v[order]
        keep = order[np.cumsum(area) <= _BUILDING_SHARE * h * w]
        keep = keep[np.argsort(cy[keep], kind="stable")]
        return _Buildings(cy[keep], cx[keep], half_u[keep], half_v[keep], theta[keep], roof[keep])

    # -- rendering ---------------------------------------------------------------------------
    def render(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``y0:y1`` of the scene: rgb (3, rows, width) uint8 and labels (rows, width) uint8."""
        rows = np.arange(y0, y1)
        cols = np.arange(self.width)
        labels = np.full((y1 - y0, self.width), BARE_SOIL, dtype=np.uint8)
        water = self.water.grid(rows, cols) > self.water_level
        labels[self.vegetation.grid(rows, cols) > self.vegetation_level] = VEGETATION
        labels[water] = WATER
        del water
        paint = self._draw_roads(labels, rows, cols)
        footprints = self._draw_buildings(labels, y0, y1)

        rgb = self._ground(labels, rows, cols)
        for sl, (py, px) in paint:
            rgb[sl][py, px] = _PAINT
        dy, dx = self.shadow
        for sl, _u, _v, _inside, in_shadow, _roof in footprints:
            # cast shadows darken the ground only (a roof in the shadow of a neighbour stays lit)
            target = in_shadow & (labels[sl] != BUILDING)
            rgb[sl][target] *= np.float32(0.5)
        for sl, u, v, inside, _in_shadow, roof in footprints:
            rgb[sl][inside] = self._roof(u[inside], v[inside], roof)
        self._camera(rgb, rows, cols)
        out = np.clip(rgb, 0, 255, out=rgb)
        out = np.rint(out, out=out).astype(np.uint8)
        return np.ascontiguousarray(out.transpose(2, 0, 1)), labels

    def _draw_roads(self, labels: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    ) -> list[tuple[tuple[slice, slice], tuple[np.ndarray, np.ndarray]]]:
        """Burn roads into ``labels``; return where lane and edge lines are painted."""
        y0, y1, width = int(rows[0]), int(rows[-1]) + 1, self.width
        paint = []
        for road in self.roads:
            hw = road.half_width
            if road.vertical:
                c, dc = road.centre(rows)
                reach = hw * np.sqrt(1 + dc * dc) + 2
                x0 = max(0, int(np.floor((c - reach).min())))
                x1 = min(width, int(np.ceil((c + reach).max())) + 1)
                if x0 >= x1:
                    continue
                sl = (slice(0, y1 - y0), slice(x0, x1))
                d = ((cols[None, x0:x1].astype(np.float32) - c.astype(np.float32)[:, None])
                     / np.sqrt(1 + dc * dc).astype(np.float32)[:, None])
                along = np.broadcast_to(rows[:, None], d.shape)
            else:
                c, dc = road.centre(cols)
                reach = hw * np.sqrt(1 + dc * dc) + 2
                hit = np.flatnonzero((c + reach >= y0) & (c - reach < y1))
                if hit.size == 0:
                    continue
                x0, x1 = int(hit[0]), int(hit[-1]) + 1
                sl = (slice(0, y1 - y0), slice(x0, x1))
                d = ((rows[:, None].astype(np.float32) - c[x0:x1].astype(np.float32)[None, :])
                     / np.sqrt(1 + dc[x0:x1] * dc[x0:x1]).astype(np.float32)[None, :])
                along = np.broadcast_to(cols[None, x0:x1], d.shape)
            ad = np.abs(d)
            on_road = ad <= hw
            labels[sl][on_road] = ROAD
            dashes = (ad < 0.8) & ((along // 12) % 2 == 0)
            edges = (ad > hw - 2.3) & (ad < hw - 1.3)
            paint.append((sl, np.nonzero((dashes | edges) & on_road)))
        return paint

    def _draw_buildings(self, labels: np.ndarray, y0: int, y1: int) -> list[tuple]:
        """Burn building footprints into ``labels``; return each footprint's local geometry."""
        b = self.buildings
        if b.cy.size == 0:
            return []
        dy, dx = self.shadow
        margin = float(b.radius.max()) + abs(dy) + 2
        lo, hi = np.searchsorted(b.cy, [y0 - margin, y1 + margin])
        out = []
        for i in range(lo, hi):
            cy, cx, r = b.cy[i], b.cx[i], float(b.radius[i])
            by0 = max(y0, math.floor(cy - r - max(0.0, -dy)) - 1)
            by1 = min(y1, math.ceil(cy + r + max(0.0, dy)) + 2)
            bx0 = max(0, math.floor(cx - r - max(0.0, -dx)) - 1)
            bx1 = min(self.width, math.ceil(cx + r + max(0.0, dx)) + 2)
            if by0 >= by1 or bx0 >= bx1:
                continue
            yy = (np.arange(by0, by1, dtype=np.float32) - np.float32(cy))[:, None]
            xx = (np.arange(bx0, bx1, dtype=np.float32) - np.float32(cx))[None, :]
            cu, su = np.float32(math.cos(b.theta[i])), np.float32(math.sin(b.theta[i]))
            hu, hv = np.float32(b.half_u[i]), np.float32(b.half_v[i])
            u = xx * cu + yy * su
            v = yy * cu - xx * su
            inside = (np.abs(u) <= hu) & (np.abs(v) <= hv)
            us = u - np.float32(dx * cu + dy * su)
            vs = v - np.float32(dy * cu - dx * su)
            in_shadow = (np.abs(us) <= hu) & (np.abs(vs) <= hv)
            sl = (slice(by0 - y0, by1 - y0), slice(bx0, bx1))
            labels[sl][inside] = BUILDING
            out.append((sl, u, v, inside, in_shadow, (int(b.roof[i]), float(hu), float(hv))))
        return out

    def _ground(self, labels: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Colour and texture of every class but the roofs: (rows, width, 3) float32."""
        k = self.keys
        f32 = np.float32
        grain = uniform(rows[:, None], cols[None, :], k["grain"]) - f32(0.5)
        # bare soil: field patches between brown and sand, fine grain
        soil_mix = 0.7 * noise_grid(rows, cols, 96, k["soil_a"]) + 0.3 * noise_grid(rows, cols, 32, k["soil_b"])
        soil_lum = 1 + f32(0.16) * grain + f32(0.20) * (noise_grid(rows, cols, 2.5, k["soil_c"]) - f32(0.5))
        # water: depth tone and fine, slightly warped ripples (wavelength ~5 px)
        water_mix = noise_grid(rows, cols, 128, k["water_depth"])
        ca, sa = f32(math.cos(self.ripple_angle)), f32(math.sin(self.ripple_angle))
        phase = (cols[None, :].astype(np.float32) * ca + rows[:, None].astype(np.float32) * sa) * f32(2 * math.pi / 5.5)
        phase += f32(6.0) * noise_grid(rows, cols, 24, k["water_warp"])
        water_lum = 1 + f32(0.14) * np.sin(phase) + f32(0.05) * grain
        del phase
        # vegetation: blobby canopy (crowns of ~4–9 px) over a slowly varying green
        canopy = (f32(0.6) * noise_grid(rows, cols, 4, k["canopy_a"])
                  + f32(0.4) * noise_grid(rows, cols, 9, k["canopy_b"]))
        veg_lum = f32(0.62) + f32(0.8) * canopy + f32(0.08) * grain
        veg_mix = f32(0.5) * noise_grid(rows, cols, 64, k["canopy_tone"]) + f32(0.5) * canopy
        del canopy
        # roads: worn asphalt, slight grain
        road_mix = noise_grid(rows, cols, 40, k["asphalt"])
        road_lum = 1 + f32(0.08) * grain
        zero, one = np.zeros_like(grain), np.ones_like(grain)
        mix = np.choose(labels, [soil_mix, water_mix, veg_mix, zero, road_mix])
        lum = np.choose(labels, [soil_lum, water_lum, veg_lum, one, road_lum])
        c1 = _C1[labels]
        rgb = c1 + (_C2[labels] - c1) * mix[..., None]
        rgb *= lum[..., None]
        return rgb

    @staticmethod
    def _roof(u_in: np.ndarray, v_in: np.ndarray, roof: tuple[int, float, float]) -> np.ndarray:
        """Roof pixels: gabled (two faces lit differently), tiled or plain, with a bright edge."""
        kind, hu, hv = roof
        colour = _ROOFS[kind]
        shade = np.where(v_in < 0, np.float32(1.12), np.float32(0.84))
        if kind == 0:  # tile rows along the ridge
            shade = shade * (1 + np.float32(0.07) * np.sin(v_in * np.float32(2 * math.pi / 3.0)))
        out = colour[None, :] * shade[:, None]
        edge = np.minimum(hu - np.abs(u_in), hv - np.abs(v_in)) < 1.6
        ridge = np.abs(v_in) < 0.7
        out[edge] = out[edge] * np.float32(0.45) + np.float32(0.55 * 245)
        out[ridge & ~edge] *= np.float32(1.15)
        return out

    def _camera(self, rgb: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        """Illumination gradient + haze (multiplicative), sensor noise (additive); in place."""
        f32 = np.float32
        ca, sa = math.cos(self.illum_angle), math.sin(self.illum_angle)
        span = abs(ca) * self.width + abs(sa) * self.height or 1.0
        start = min(0.0, ca * self.width) + min(0.0, sa * self.height)
        # 0..1 across the scene; built from 1-D float32 pieces (no float64 strip temporary)
        ramp = ((cols.astype(np.float32) * f32(ca) - f32(start))[None, :]
                + (rows.astype(np.float32) * f32(sa))[:, None]) / f32(span)
        illum = 1 + f32(self.illum_strength) * (2 * ramp - 1)
        illum += f32(0.06) * (noise_grid(rows, cols, 600, self.keys["haze"]) - f32(0.5))
        rgb *= illum[..., None]
        h = hash_coords(rows[:, None], cols[None, :], self.keys["sensor"])
        for c in range(3):
            bits = ((h >> np.uint32(10 * c)) & np.uint32(1023)).astype(np.float32)
            rgb[..., c] += bits * f32(10.0 / 1023) - f32(5.0)


def check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ConfigError(f"{height}x{width}", "a scene needs a positive height and width")


def generate_scene(height: int, width: int, seed: int, *, strip_rows: int = STRIP_ROWS,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic scene: rgb (3, height, width) uint8 and labels (height, width) uint8 (ids of :data:`CLASSES`).

    Deterministic per (height, width, seed). Rendered ``strip_rows`` rows at a time, so besides
    the outputs only a strip of float32 temporaries is held (an 8000² scene: 256 MB of outputs);
    any ``strip_rows`` gives the same pixels.
    """
    check_size(height, width)
    if strip_rows < 1:
        raise ConfigError("strip_rows", f"must be positive, got {strip_rows}")
    scene = Scene(height, width, seed)
    rgb = np.empty((3, height, width), dtype=np.uint8)
    labels = np.empty((height, width), dtype=np.uint8)
    for y0 in range(0, height, strip_rows):
        y1 = min(height, y0 + strip_rows)
        rgb[:, y0:y1], labels[y0:y1] = scene.render(y0, y1)
    return rgb, labels
