"""The annotation loop end to end, with real processes, over three retrain rounds: segment → export
GeoPackages → an annotator corrects them in place (reclassify, delete, draw: pixel areas the test
knows exactly) → retrain with promotion → the nightly run recomputes with the new champion → the
annotator corrects again (an old file further, a new export, one file left alone) → retrain from
another working directory. Every reported figure equals the test's own count, and no file is ever
compared with a model output it did not start from."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = ["--epochs", "1", "--batch-size", "4", "--patch-size", "64", "--patches-per-epoch", "8", "--device", "cpu",
        "--precision", "fp32"]


def segpipe(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "segpipe.cli.main", *args], capture_output=True, text=True,
                       env=env, timeout=900, cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _geometry(blob: bytes):
    """A GeoPackage geometry blob's shapely geometry (header: 'GP', version, flags, srs id, envelope)."""
    import shapely

    envelope = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}[(blob[3] >> 1) & 7]
    return shapely.from_wkb(bytes(blob[8 + envelope:]))


def edit_in_place(gpkg: Path, *, reclassify: dict[int, tuple[int, str]], delete: tuple[int, ...], draw: tuple,
                  draw_class: tuple[int, str]) -> None:
    """What QGIS does when a layer is edited and its edits saved: the same file, changed rows (its metadata and
    other tables stay). SQLite needs GDAL's ST_* functions for the R-tree triggers GDAL created."""
    import pyogrio
    import shapely

    db = sqlite3.connect(gpkg)
    db.create_function("ST_IsEmpty", 1, lambda b: int(_geometry(b).is_empty), deterministic=True)
    for name, i in (("ST_MinX", 0), ("ST_MinY", 1), ("ST_MaxX", 2), ("ST_MaxY", 3)):
        db.create_function(name, 1, lambda b, i=i: _geometry(b).bounds[i], deterministic=True)
    with db:
        for fid, (cid, cname) in reclassify.items():
            db.execute("UPDATE segments SET class_id = ?, class_name = ? WHERE fid = ?", (cid, cname, fid))
        for fid in delete:
            db.execute("DELETE FROM segments WHERE fid = ?", (fid,))
    db.close()
    if draw:
        crs = pyogrio.read_info(gpkg)["crs"]
        pyogrio.raw.write(gpkg, np.array(shapely.to_wkb(list(draw)), dtype=object),
                          field_data=[np.full(len(draw), draw_class[0], np.int32),
                                      np.array([draw_class[1]] * len(draw), dtype=object),
                                      np.array([g.area for g in draw])],
                          fields=["class_id", "class_name", "area"], layer="segments", driver="GPKG", append=True,
                          crs=crs, geometry_type="Polygon")


def features(gpkg: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    import pyogrio
    import shapely

    meta, fids, wkb, fields = pyogrio.raw.read(gpkg, return_fids=True)
    return fids, shapely.from_wkb(wkb), [int(c) for c in fields[meta["fields"].tolist().index("class_id")]]


class Annotator:
    """Edits a file and keeps, beside it, the labels it must now hold (the test's own raster of them)."""

    def __init__(self, model: np.ndarray, transform: tuple[float, ...], road: int) -> None:
        self.model, self.expected = model, model.copy()
        self.transform, self.road = transform, road

    def mask(self, geom) -> np.ndarray:
        from affine import Affine
        from rasterio.features import geometry_mask

        m = geometry_mask([geom], out_shape=self.model.shape, transform=Affine(*self.transform[:6]), invert=True)
        assert m.sum() * 0.25 == pytest.approx(geom.area)  # pixel-aligned: its area is whole pixels (0.5 m)
        return m

    def box(self, row: int, col: int, h: int, w: int):
        import shapely

        a, _, c, _, e, f = self.transform[:6]
        return shapely.box(c + col * a, f + (row + h) * e, c + (col + w) * a, f + row * e)

    def correct(self, gpkg: Path, *, boxes: tuple, reclassify_and_delete: bool = True) -> None:
        fids, geoms, cls = features(gpkg)
        order = np.argsort(-np.array([g.area for g in geoms]))
        reclassify: dict[int, tuple[int, str]] = {}
        delete: tuple[int, ...] = ()
        if reclassify_and_delete:
            small = [i for i in order if geoms[i].area < 0.1 * self.model.size * 0.25]  # < 10 % of the image
            p = next(i for i in small if cls[i] != self.road)  # the largest of them that is not a road
            q = next(i for i in small if i != p and cls[i] != 0)  # the next largest not of the unlabelled class
            reclassify = {int(fids[p]): (self.road, "road")}
            delete = (int(fids[q]),)
            self.expected[self.mask(geoms[p])] = self.road
            self.expected[self.mask(geoms[q])] = 0  # no polygon: "unlabelled" = class 0
        for b in boxes:  # drawn as road: the top class, on top of every other polygon
            self.expected[self.mask(b)] = self.road
        edit_in_place(gpkg, reclassify=reclassify, delete=delete, draw=boxes, draw_class=(self.road, "road"))

    def figures(self, against: np.ndarray | None = None) -> tuple[int, int, float]:
        """(labelled pixels, changed pixels, mean Dice) of the expected labels vs the model's."""
        model = self.model if against is None else against
        k = self.road + 1
        cm = np.bincount(self.expected.ravel().astype(np.int64) * k + model.ravel(), minlength=k * k).reshape(k, k)
        denom = cm.sum(0) + cm.sum(1)
        dice = [2 * cm[i, i] / denom[i] for i in range(k) if denom[i]]
        return int(cm.sum()), int(cm.sum() - np.trace(cm)), float(np.mean(dice))


def check(files: dict[str, dict], name: str, who: Annotator, output: Path) -> None:
    pixels, changed, dice = who.figures()
    f = files[name]
    assert f["outcome"] == "compared", f
    assert (f["pixels"], f["changed_pixels"]) == (pixels, changed) and f["mean_dice"] == pytest.approx(dice)
    assert f["model_output"] == str(output)  # the origin, found from any working directory


def test_three_rounds_of_corrections_stay_true(tmp_path):
    from segpipe.train.synthetic import write_dataset

    env = {**os.environ, "SEGPIPE_LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    raster = write_dataset(tmp_path / "raster", 3, 96, seed=5)
    site, cron, elsewhere = (tmp_path / d for d in ("site", "cron", "elsewhere"))
    for d in (site, cron, elsewhere):
        d.mkdir()
    reg = tmp_path / "registry"
    # round 0: a first champion, trained on raster masks
    segpipe("retrain", "--data", str(raster), "--registry", str(reg), *TINY, env=env, cwd=cron)
    # the nightly run, from its own folder with a relative --out: outputs and GeoPackages
    common = ["--model", str(reg), "--out", "nightly", "--chunk-size", "64", "--halo", "16", "--precision", "fp32",
              "--no-progress", "--vector", "gpkg"]
    segpipe("segment", str(raster / "images"), *common, env=env, cwd=site)
    nightly = site / "nightly"
    names = ["scene_000", "scene_001", "scene_002"]  # split.json: 000 and 002 train, 001 val
    v1 = {n: zarr.open_group(str(nightly / f"{n}.zarr"), mode="r")["0"][:] for n in names}
    transform = {n: tuple(zarr.open_group(str(nightly / f"{n}.zarr"), mode="r").attrs["segpipe"]["transform"])
                 for n in names}

    data = tmp_path / "data"
    (data / "labels").mkdir(parents=True)
    (data / "images").symlink_to(raster / "images", target_is_directory=True)
    classes = json.loads((raster / "classes.json").read_text())
    classes["unlabelled"] = classes["classes"][0]["name"]  # a deleted polygon becomes class 0
    (data / "classes.json").write_text(json.dumps(classes))
    (data / "split.json").write_text((raster / "split.json").read_text())
    road = len(classes["classes"]) - 1

    # round 1: the annotator copies each export into DATA/labels and edits the copy in place
    who: dict[str, Annotator] = {}
    for i, n in enumerate(names):
        shutil.copy(nightly / f"{n}.gpkg", data / "labels" / f"{n}.gpkg")
        who[n] = Annotator(v1[n], transform[n], road)
        who[n].correct(data / "labels" / f"{n}.gpkg", boxes=(who[n].box(4 + 10 * i, 8, 12, 20),))
    # retrain from another folder; margin -1: the challenger wins, so the nightly has a new champion to use
    r = segpipe("retrain", "--data", str(data), "--registry", str(reg), "--margin", "-1", "--allow-negative-margin",
                *TINY, env=env, cwd=cron)
    first = json.loads(r.stdout[r.stdout.index("{"):])
    assert first["promoted"] and first["version"] == "v2"
    corr = first["corrections"]
    files = {f["image"]: f for f in corr["files"]}
    for n in names:
        check(files, n, who[n], nightly / f"{n}.zarr")
    expected = [who[n].figures() for n in names]
    assert (corr["pixels"], corr["changed_pixels"]) == (sum(e[0] for e in expected), sum(e[1] for e in expected))
    assert corr["changed_pixels_val"] == expected[1][1] and corr["changed_pixels_train"] == expected[0][1] + expected[2][1]
    report = Path(first["report"]).with_name("report.md").read_text()
    assert "## Corrections: what annotators changed" in report and "CRS units²" in report
    assert f"on val images: {expected[1][1]:,} (they change its score only" in report
    saved = json.loads(Path(first["report"]).with_name("corrections.json").read_text())
    assert saved["changed_pixels"] == corr["changed_pixels"] and sum(
        v["added_pixels"] for v in saved["per_class"].values()) == corr["changed_pixels"]

    # the nightly run recomputes every output with the new champion (and re-exports)
    rerun = segpipe("segment", str(raster / "images"), *common, env=env, cwd=site)
    assert rerun.stderr.count("replacing the complete output (model weights") == 3
    v2 = {n: zarr.open_group(str(nightly / f"{n}.zarr"), mode="r")["0"][:] for n in names}
    assert all(zarr.open_group(str(nightly / f"{n}.zarr"), mode="r").attrs["segpipe"]["model"]["uri"].endswith("v2")
               for n in names)
    assert all((v2[n] != v1[n]).any() for n in names)  # else "not compared with v2" would prove nothing

    # round 2: scene_000's file is corrected further, scene_001 is corrected afresh from the new export,
    # scene_002's file stays as it was
    who["scene_000"].correct(data / "labels" / "scene_000.gpkg", boxes=(who["scene_000"].box(70, 60, 16, 16),),
                             reclassify_and_delete=False)
    shutil.copy(nightly / "scene_001.gpkg", data / "labels" / "scene_001.gpkg")
    who["scene_001"] = Annotator(v2["scene_001"], transform["scene_001"], road)
    who["scene_001"].correct(data / "labels" / "scene_001.gpkg", boxes=(who["scene_001"].box(50, 40, 8, 24),))
    # retrain from yet another folder; margin 1: the challenger is registered but rejected
    before = {p: p.stat().st_size for p in reg.rglob("*") if p.is_file()}
    r = segpipe("retrain", "--data", str(data), "--registry", str(reg), "--margin", "1", *TINY, env=env,
                cwd=elsewhere)
    second = json.loads(r.stdout[r.stdout.index("{"):])
    assert not second["promoted"] and second["version"] == "v3"
    files = {f["image"]: f for f in second["corrections"]["files"]}
    for n in names:
        check(files, n, who[n], nightly / f"{n}.zarr")
    for n in ("scene_000", "scene_002"):  # compared with v1's labels the files carry, never v2's output
        assert files[n]["changed_pixels"] != who[n].figures(against=v2[n])[1]
        assert "recomputed since by" in files[n]["reason"] and "v2" in files[n]["reason"]
    assert files["scene_001"]["reason"] == ""  # the v2 export: its output is still the one it started from

    # a rejected challenger costs the registry its weights (and small reports): no checkpoint, no second copy
    added = {p: s for p, s in ((p, p.stat().st_size) for p in reg.rglob("*") if p.is_file()) if p not in before}
    weights = reg / "v3" / "weights.safetensors"
    assert [p for p in added if p.suffix == ".safetensors"] == [weights]
    assert sum(added.values()) - weights.stat().st_size < 1_000_000, sorted(added.items(), key=lambda x: -x[1])[:5]
