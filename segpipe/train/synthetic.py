"""Synthetic scenes written as files: a training dataset (:func:`write_dataset`) or one large
GeoTIFF (:func:`write_scene`), for the demo, the tests and benchmarks.

The scenes come from :mod:`segpipe.train.synthetic_scene` (same seed, same pixels); this module
owns their georeference (:data:`PIXEL_SIZE`, :data:`CRS`), the GeoTIFF profiles, the mask
colour table and the dataset layout that :mod:`segpipe.labels.dataset` reads. A large scene is
written strip by strip, so its size is bounded by disk, not RAM.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from segpipe.core.errors import ConfigError
from segpipe.train.synthetic_scene import CLASS_COLORS, CLASSES, STRIP_ROWS, Scene, check_size, generate_scene

#: ground sampling distance of the synthetic scenes, metres per pixel
PIXEL_SIZE = 0.5
#: WGS 84 / UTM zone 33N: a plausible projected CRS for the georeference
CRS = "EPSG:32633"


def class_table() -> list[dict[str, str]]:
    """``[{"name", "color"}, ...]`` as written to ``classes.json``."""
    return [{"name": n, "color": c} for n, c in zip(CLASSES, CLASS_COLORS)]


def _colormap() -> dict[int, tuple[int, int, int, int]]:
    from segpipe.core.classes import palette_rgba

    return {i: tuple(int(v) for v in rgba) for i, rgba in enumerate(palette_rgba(len(CLASSES), CLASS_COLORS))}


def _geotiff_profile(height: int, width: int, count: int, block: int, x0: float, y0: float) -> dict:
    from affine import Affine

    profile = {
        "driver": "GTiff", "height": height, "width": width, "count": count, "dtype": "uint8",
        "crs": CRS, "transform": Affine(PIXEL_SIZE, 0.0, x0, 0.0, -PIXEL_SIZE, y0),
        "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    if count == 3:
        profile.update(photometric="RGB", interleave="pixel", predictor=2)
    return profile


def write_dataset(root: str | Path, n_images: int, size: int | tuple[int, int], seed: int) -> Path:
    """Write a training dataset of ``n_images`` scenes under ``root``; returns ``root``.

    Layout (what :mod:`segpipe.labels.dataset` reads)::

        root/images/<name>.tif   RGB uint8 GeoTIFF (tiled 256, deflate, EPSG:32633, 0.5 m pixels)
        root/masks/<name>.tif    single-band uint8 class ids, same grid, with a colour table
        root/classes.json        {"classes": [{"name", "color"}, ...]}
        root/split.json          {"train": [names], "val": [names]}   (~20 % val, seeded)

    Scene *i* is drawn from its own seed derived from (``seed``, *i*), and placed at its own
    map position so the georeferences do not overlap.
    """
    import rasterio

    if n_images < 1:
        raise ConfigError("n_images", f"must be at least 1, got {n_images}")
    height, width = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    check_size(height, width)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(n_images - 1)))
    names = [f"scene_{i:0{digits}d}" for i in range(n_images)]
    for i, name in enumerate(names):
        scene_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        rgb, labels = generate_scene(height, width, scene_seed)
        x0 = 400_000.0 + i * (width * PIXEL_SIZE + 100.0)
        y0 = 5_800_000.0
        with rasterio.open(root / "images" / f"{name}.tif", "w",
                           **_geotiff_profile(height, width, 3, 256, x0, y0)) as dst:
            dst.write(rgb)
        with rasterio.open(root / "masks" / f"{name}.tif", "w",
                           **_geotiff_profile(height, width, 1, 256, x0, y0)) as dst:
            dst.write(labels[None])
            dst.write_colormap(1, _colormap())
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B17]))
    n_val = 0 if n_images < 2 else max(1, round(0.2 * n_images))
    val = set(rng.choice(n_images, size=n_val, replace=False).tolist())
    split = {"train": [n for i, n in enumerate(names) if i not in val],
             "val": [n for i, n in enumerate(names) if i in val]}
    (root / "classes.json").write_text(json.dumps({"classes": class_table()}, indent=2) + "\n")
    (root / "split.json").write_text(json.dumps(split, indent=2) + "\n")
    return root


def write_scene(path: str | Path, height: int, width: int, seed: int,
                mask_path: str | Path | None = None) -> Path:
    """Write one large scene as an RGB GeoTIFF (tiled 512, deflate, EPSG:32633), strip by strip.

    The same pixels as :func:`generate_scene` (height, width, seed), but only one 512-row band
    (uint8) and one strip of float32 temporaries are in memory at a time, so the size is bounded
    by disk, not RAM. With ``mask_path`` the labels go to a matching single-band GeoTIFF.
    """
    import rasterio
    from rasterio.windows import Window

    check_size(height, width)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = Scene(height, width, seed)
    band = 512  # one row of tiles: every write covers whole tiles
    x0, y0 = 500_000.0, 5_800_000.0
    mask_dst = None
    with rasterio.open(path, "w", **_geotiff_profile(height, width, 3, 512, x0, y0)) as dst:
        try:
            if mask_path is not None:
                Path(mask_path).parent.mkdir(parents=True, exist_ok=True)
                mask_dst = rasterio.open(mask_path, "w", **_geotiff_profile(height, width, 1, 512, x0, y0))
                mask_dst.write_colormap(1, _colormap())
            for b0 in range(0, height, band):
                b1 = min(height, b0 + band)
                rgb = np.empty((3, b1 - b0, width), dtype=np.uint8)
                labels = np.empty((b1 - b0, width), dtype=np.uint8)
                for s0 in range(b0, b1, STRIP_ROWS):
                    s1 = min(b1, s0 + STRIP_ROWS)
                    rgb[:, s0 - b0:s1 - b0], labels[s0 - b0:s1 - b0] = scene.render(s0, s1)
                window = Window(0, b0, width, b1 - b0)
                dst.write(rgb, window=window)
                if mask_dst is not None:
                    mask_dst.write(labels[None], window=window)
        finally:
            if mask_dst is not None:
                mask_dst.close()
    return path
