"""The annotation loop end to end, with real processes: segment → export a GeoPackage → an annotator
corrects it → retrain on the corrected file → the report shows the corrections and the gate decides →
the nightly run recomputes with the new champion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = ["--epochs", "1", "--batch-size", "4", "--patch-size", "64", "--patches-per-epoch", "8", "--device", "cpu",
        "--precision", "fp32"]


def segpipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "segpipe.cli.main", *args], capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_correct_the_models_polygons_and_retrain_on_them(tmp_path):
    import pyogrio
    import shapely

    from segpipe.train.synthetic import write_dataset

    env = {**os.environ, "SEGPIPE_LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    raster = write_dataset(tmp_path / "raster", 3, 96, seed=5)
    reg = tmp_path / "registry"
    # a first champion, trained on raster masks
    segpipe("retrain", "--data", str(raster), "--registry", str(reg), *TINY, env=env)
    # 1. the nightly run: segment and export a GeoPackage per image
    nightly = tmp_path / "nightly"
    common = ["--model", str(reg), "--out", str(nightly), "--chunk-size", "64", "--halo", "16", "--precision",
              "fp32", "--no-progress"]
    segpipe("segment", str(raster / "images"), *common, "--vector", "gpkg", env=env)
    # 2. an annotator corrects the polygons (as QGIS edits a layer in place: its metadata stays)
    data = tmp_path / "data"
    (data / "labels").mkdir(parents=True)
    (data / "images").symlink_to(raster / "images", target_is_directory=True)
    classes = json.loads((raster / "classes.json").read_text())
    classes["unlabelled"] = "ignore"
    (data / "classes.json").write_text(json.dumps(classes))
    (data / "split.json").write_text((raster / "split.json").read_text())
    names = [c["name"] for c in classes["classes"]]
    for gpkg in sorted(nightly.glob("*.gpkg")):
        info = pyogrio.read_info(gpkg)
        assert info["layer_metadata"]["segpipe_output"] == str(gpkg.with_suffix(".zarr"))  # provenance
        meta, _, geoms, fields = pyogrio.raw.read(gpkg)
        geoms = shapely.from_wkb(geoms)
        cls = list(fields[meta["fields"].tolist().index("class_name")])
        order = np.argsort(-shapely.area(geoms))
        cls[order[0]] = names[(names.index(cls[order[0]]) + 1) % len(names)]  # one polygon reclassified
        keep = np.ones(len(geoms), bool)
        keep[order[1]] = False  # one deleted
        x0, y0, x1, y1 = shapely.total_bounds(geoms)
        drawn = shapely.box(x0, y0, x0 + (x1 - x0) / 4, y0 + (y1 - y0) / 4)  # one drawn
        out_geoms = np.concatenate([geoms[keep], [drawn]])
        out_cls = np.array([c for c, k in zip(cls, keep) if k] + [names[-1]], dtype=object)
        pyogrio.raw.write(data / "labels" / gpkg.name, shapely.to_wkb(out_geoms), field_data=[out_cls],
                          fields=["class"], crs=meta["crs"], geometry_type="Polygon", driver="GPKG",
                          layer="segments", layer_metadata=info["layer_metadata"])
    # 3. retrain on the corrected files; 4. the report shows what changed, and the gate decides
    #    (margin -1: the challenger wins whatever it scores, so step 5 has a new champion to see)
    r = segpipe("retrain", "--data", str(data), "--registry", str(reg), "--margin", "-1", *TINY, env=env)
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["promoted"] and result["version"] == "v2"
    corr = result["corrections"]
    assert len(corr["images"]) == 3 and 0 < corr["changed_fraction"] < 1 and 0 < corr["mean_dice"] < 1
    report = Path(result["report"]).with_name("report.md").read_text()
    assert "## Corrections: what annotators changed" in report and "CRS units²" in report
    saved = json.loads(Path(result["report"]).with_name("corrections.json").read_text())
    assert saved["changed_pixels"] == corr["changed_pixels"] and sum(
        v["added_pixels"] for v in saved["per_class"].values()) == corr["changed_pixels"]
    # 5. the nightly run recomputes every output with the new champion
    rerun = segpipe("segment", str(raster / "images"), *common, env=env)
    assert rerun.stderr.count("replacing the complete output (model weights") == 3
    for z in nightly.glob("*.zarr"):
        assert zarr.open_group(str(z), mode="r").attrs["segpipe"]["model"]["uri"].endswith("v2")
