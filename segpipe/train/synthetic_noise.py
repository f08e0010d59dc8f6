"""Coordinate-hashed value noise for the synthetic scenes (:mod:`segpipe.train.synthetic_scene`).

Every value is a function of absolute pixel coordinates and a key (hashed lattice noise, no
global random grids), so a scene rendered strip by strip gives the same pixels for any strip
height. :func:`hash_coords` / :func:`uniform` give per-pixel values, :func:`noise_grid` /
:func:`noise_points` smooth value noise on a grid or at scattered points, :class:`NoiseField`
a sum of octaves; :func:`seeded_key` and :func:`seeded_field` derive keys from a scene seed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

_M1, _M2 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77)
_M3, _M4 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)


def _mix(h: np.ndarray) -> np.ndarray:
    """murmur3 finaliser (in place on a uint32 array; wraps on overflow by design)."""
    h ^= h >> np.uint32(16)
    h *= _M3
    h ^= h >> np.uint32(13)
    h *= _M4
    h ^= h >> np.uint32(16)
    return h


def hash_coords(ys: np.ndarray, xs: np.ndarray, key: int) -> np.ndarray:
    """uint32 hash of integer coordinates (broadcast): the same pixel always gets the same value."""
    h = _mix(np.asarray(ys).astype(np.uint32) * _M1 ^ np.uint32(key))
    return _mix(h ^ (np.asarray(xs).astype(np.uint32) * _M2))


def uniform(ys: np.ndarray, xs: np.ndarray, key: int) -> np.ndarray:
    """float32 in [0, 1) per coordinate pair."""
    return (hash_coords(ys, xs, key) >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def _lattice(coords: np.ndarray, cell: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index below each coordinate and the smoothstep weight of the next one."""
    t = (np.asarray(coords, dtype=np.float64) + offset) / cell
    i = np.floor(t)
    f = (t - i).astype(np.float32)
    return i.astype(np.int64), f * f * (np.float32(3) - np.float32(2) * f)


def _octave_offset(key: int, cell: float) -> float:
    # shifts each octave's lattice so lattice lines of different octaves do not coincide
    return (key % 10007) / 10007.0 * cell


def noise_grid(rows: np.ndarray, cols: np.ndarray, cell: float, key: int) -> np.ndarray:
    """Value noise in [0, 1) on the grid rows × cols: hashed lattice values, smoothly interpolated.

    Only the lattice points covering the grid are hashed, then interpolated separably
    (first along x on the lattice rows, then along y), so the cost is ~2 gathers per pixel.
    """
    off = _octave_offset(key, cell)
    iy, fy = _lattice(rows, cell, off)
    ix, fx = _lattice(cols, cell, off)
    ly0, lx0 = int(iy.min()), int(ix.min())
    lat = uniform(np.arange(ly0, int(iy.max()) + 2)[:, None], np.arange(lx0, int(ix.max()) + 2)[None, :], key)
    jx = ix - lx0
    left = lat[:, jx]
    along_x = left + (lat[:, jx + 1] - left) * fx
    jy = iy - ly0
    top = along_x[jy]
    return top + (along_x[jy + 1] - top) * fy[:, None]


def noise_points(ys: np.ndarray, xs: np.ndarray, cell: float, key: int) -> np.ndarray:
    """The same value noise as :func:`noise_grid`, at scattered points."""
    off = _octave_offset(key, cell)
    iy, fy = _lattice(ys, cell, off)
    ix, fx = _lattice(xs, cell, off)
    a, b = uniform(iy, ix, key), uniform(iy, ix + 1, key)
    c, d = uniform(iy + 1, ix, key), uniform(iy + 1, ix + 1, key)
    top = a + (b - a) * fx
    return top + (c + (d - c) * fx - top) * fy


@dataclass(frozen=True)
class NoiseField:
    """A sum of value-noise octaves (cells in px, weights), normalised to [0, 1)."""

    cells: tuple[float, ...]
    weights: tuple[float, ...]
    keys: tuple[int, ...]

    def grid(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), len(cols)), dtype=np.float32)
        for cell, w, key in zip(self.cells, self.weights, self.keys):
            out += np.float32(w) * noise_grid(rows, cols, cell, key)
        return out / np.float32(sum(self.weights))

    def points(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast(ys, xs).shape, dtype=np.float32)
        for cell, w, key in zip(self.cells, self.weights, self.keys):
            out += np.float32(w) * noise_points(ys, xs, cell, key)
        return out / np.float32(sum(self.weights))


def seeded_key(seed: int, salt: str) -> int:
    """A noise key from a scene seed and a name (independent streams per name)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(salt.encode())]).generate_state(1)[0])


def seeded_field(seed: int, name: str, cells: tuple[float, ...], weights: tuple[float, ...]) -> NoiseField:
    """A :class:`NoiseField` whose octave keys derive from ``seed`` and ``name``."""
    return NoiseField(cells, weights, tuple(seeded_key(seed, f"{name}/{i}") for i in range(len(cells))))
