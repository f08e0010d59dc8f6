"""The corrections figures from one confusion matrix (rows: corrected labels, columns: the model's)."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe.core.metrics import ConfusionMatrix
from segpipe.evaluate.corrections import corrections_markdown, summarize


def test_added_removed_and_dice_counted_by_hand():
    cm = ConfusionMatrix(3)
    corrected = np.array([[0, 0, 1, 1], [1, 2, 2, 0]])
    model = np.array([[0, 1, 1, 1], [1, 2, 0, 0]])
    cm.update(corrected, model)
    s = summarize(cm, ["bg", "house", "road"], area=0.25, unit="CRS units²")
    # class 0: corrected 3 px (0,0),(0,1),(1,3); model 3 px (0,0),(1,2),(1,3); both: 2 → added 1, removed 1
    assert s["per_class"]["bg"] == {"added_pixels": 1, "removed_pixels": 1, "added_area": 0.25, "removed_area": 0.25,
                                    "dice": pytest.approx(2 * 2 / 6)}
    # class 1: corrected 3 (0,2),(0,3),(1,0); model 4 (0,1),(0,2),(0,3),(1,0): added 0, removed 1
    assert s["per_class"]["house"]["added_pixels"] == 0 and s["per_class"]["house"]["removed_pixels"] == 1
    assert s["per_class"]["house"]["dice"] == pytest.approx(2 * 3 / 7)
    # class 2: corrected 2 (1,1),(1,2); model 1 (1,1): added 1
    assert s["per_class"]["road"]["added_pixels"] == 1 and s["per_class"]["road"]["dice"] == pytest.approx(2 / 3)
    assert s["pixels"] == 8 and s["changed_pixels"] == 2 and s["changed_fraction"] == 0.25
    assert sum(c["added_pixels"] for c in s["per_class"].values()) == s["changed_pixels"]
    md = corrections_markdown({**s, "changed_pixels_train": 0, "changed_pixels_val": 2, "hand_drawn": 0, "files": [
        {"labels": "l.gpkg", "split": "val", "outcome": "compared", "reason": "", "compared_with": "o.zarr",
         "model": "REG/v1", "changed_fraction": 0.25, "mean_dice": s["mean_dice"]}]})
    assert md is not None
    assert "| house | 0.0 | 0.2 | 0.8571 |" in md and "2 of 8 labelled pixels changed (25.00 %)" in md
    assert "on val images: 2 (they change its score only" in md and "No correction lies on a train image" in md


def test_an_unchanged_class_has_dice_one_and_an_absent_one_none():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1]), np.array([0, 0, 1]))
    s = summarize(cm, ["a", "b", "c"])
    assert s["per_class"]["a"]["dice"] == 1.0 and s["per_class"]["c"]["dice"] is None and s["changed_pixels"] == 0


# --------------------------------------------------------------------------- which model labels a file started from


@pytest.fixture(scope="module")
def exported(tmp_path_factory, client, model_dir, photo):
    """A real output of a georeferenced image and its GeoPackage export (made once; tests copy what they change)."""
    from segpipe.export.vectors import export_vectors
    from tests.helpers import segment_to_zarr, write_geotiff

    root = tmp_path_factory.mktemp("exported")
    image = write_geotiff(root / "scene.tif", photo[:, :128, :160])
    out = segment_to_zarr(str(image), model_dir, root / "nightly", client, chunk=64, halo=16)
    export_vectors(out, str(root / "nightly" / "scene.gpkg"))
    export_vectors(out, str(root / "nightly" / "scene.geojson"))
    return root


def _dataset(tmp_path, exported):
    """DATA with the exported image, classes a–d (unlabelled: a), and a copy of the nightly folder."""
    import json
    import shutil

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    shutil.copy(exported / "scene.tif", data / "images" / "scene.tif")
    (data / "classes.json").write_text(json.dumps({"classes": [{"name": n} for n in "abcd"], "unlabelled": "a"}))
    nightly = tmp_path / "nightly"
    shutil.copytree(exported / "nightly", nightly)
    return data, nightly


def _save_as(src, dst) -> None:
    """QGIS "Save Features As…": a new file with the same features and columns, no metadata, nothing else."""
    import pyogrio

    meta, _, wkb, fields = pyogrio.raw.read(src)
    pyogrio.raw.write(dst, wkb, field_data=list(fields), fields=list(meta["fields"]), crs=meta["crs"],
                      geometry_type="Polygon", driver="GPKG", layer="scene")


@pytest.mark.slow
def test_a_qgis_save_as_copy_is_named_with_the_hint(tmp_path, exported, caplog):
    """Defect: "Save Features As…" drops the layer metadata and the corrections vanished without a word."""
    import logging
    import os

    from segpipe.evaluate.corrections import corrections
    from segpipe.labels.dataset import load_dataset

    data, nightly = _dataset(tmp_path, exported)
    _save_as(nightly / "scene.gpkg", data / "labels" / "scene.gpkg")

    ds = load_dataset(str(data))
    with caplog.at_level(logging.WARNING, logger="segpipe.evaluate.corrections"):
        c = corrections(ds)
    [f] = c["files"]
    assert f["outcome"] == "metadata lost" and "Save Layer Edits" in f["reason"] and c["compared"] == 0
    assert f"{data / 'labels' / 'scene.gpkg'}: has segpipe's output columns but lost the layer metadata" in caplog.text
    # with the folder it was exported from, it is compared (its output was finished before the file was saved)
    os.utime(data / "labels" / "scene.gpkg")
    c = corrections(ds, str(nightly))
    [f] = c["files"]
    assert f["outcome"] == "compared" and f["changed_pixels"] == 0 and f["pixels"] == 128 * 160


@pytest.mark.slow
def test_a_hand_drawn_file_is_never_a_correction_even_with_baseline(tmp_path, exported):
    """Defect: --baseline counted a file drawn from scratch as corrections (8.08 % changed)."""
    import numpy as np
    import pyogrio
    import shapely

    from segpipe.evaluate.corrections import corrections, corrections_markdown
    from segpipe.labels.dataset import load_dataset

    data, nightly = _dataset(tmp_path, exported)
    crs = pyogrio.read_info(nightly / "scene.gpkg")["crs"]
    box = shapely.box(500000.0, 4100000.0 - 20, 500030.0, 4100000.0)
    pyogrio.raw.write(data / "labels" / "scene.gpkg", np.array([shapely.to_wkb(box)], dtype=object),
                      field_data=[np.array(["b"], dtype=object)], fields=["class"], crs=crs, geometry_type="Polygon",
                      driver="GPKG")
    c = corrections(load_dataset(str(data)), str(nightly))
    [f] = c["files"]
    assert f["outcome"] == "hand-drawn" and c["compared"] == 0 and c["hand_drawn"] == 1 and c["changed_pixels"] == 0
    assert "1 label file(s) drawn from scratch" in corrections_markdown(c)


@pytest.mark.slow
def test_an_output_being_written_or_recomputed_is_not_compared(tmp_path, exported, caplog):
    """Defect: an output being rewritten (status running) was compared, and so was one recomputed by another model."""
    import logging
    import shutil
    import sqlite3

    from segpipe.evaluate.corrections import corrections
    from segpipe.export.origin import BASELINE_TABLE
    from segpipe.export.vectors import export_vectors
    from segpipe.io.output import read_attrs, write_attrs
    from segpipe.labels.dataset import load_dataset

    data, nightly = _dataset(tmp_path, exported)
    output = str(nightly / "scene.zarr")
    attrs = read_attrs(output)

    def outcome(labels: str, baseline: str | None = None) -> dict:
        for old in (data / "labels").iterdir():
            old.unlink()
        shutil.copy(nightly / labels, data / "labels" / labels)
        with caplog.at_level(logging.WARNING, logger="segpipe.evaluate.corrections"):
            [f] = corrections(load_dataset(str(data)), baseline)["files"]
        return f

    # a GeoJSON export records nothing: --baseline, and the output there is being written
    write_attrs(output, {**attrs, "segpipe": {**attrs["segpipe"], "status": "running"}})
    f = outcome("scene.geojson", str(nightly))
    assert f["outcome"] == "running" and "status 'running'" in f["reason"] and "changed_pixels" not in f
    assert "corrections not counted" in caplog.text
    # …then finished after the file was saved: not what the annotator started from
    write_attrs(output, {**attrs, "segpipe": {**attrs["segpipe"], "finished": "2999-01-01T00:00:00+00:00"}})
    assert outcome("scene.geojson", str(nightly))["outcome"] == "recomputed"
    # a GeoPackage that records its output but carries no copy of it (an older export): the output, while it is
    # the one recorded — here recomputed by another model
    write_attrs(output, attrs)
    export_vectors(output, str(nightly / "scene.gpkg"))  # recording this copy of the output
    with sqlite3.connect(nightly / "scene.gpkg") as db:
        db.execute(f"DROP TABLE {BASELINE_TABLE}")
    other = {**attrs["segpipe"]["model"], "uri": "REG/v9", "weights_sha256": "f" * 64}
    write_attrs(output, {**attrs, "segpipe": {**attrs["segpipe"], "model": other}})
    f = outcome("scene.gpkg")
    assert f["outcome"] == "recomputed" and "recomputed since by model REG/v9 (weights ffffffffffff)" in f["reason"]
    write_attrs(output, attrs)  # the recorded output again: compared
    f = outcome("scene.gpkg")
    assert f["outcome"] == "compared" and f["changed_pixels"] == 0


@pytest.mark.slow
def test_the_export_carries_the_model_labels_and_gdal_lists_one_layer(tmp_path, exported):
    """The copy in the GeoPackage reads as the output did, and is no layer for GDAL (so none in QGIS)."""
    import shutil
    import subprocess

    import numpy as np
    import pyogrio
    import zarr

    from segpipe.export.origin import ORIGIN_KEY, extract_baseline, read_origin

    gpkg = exported / "nightly" / "scene.gpkg"
    rec = read_origin(str(gpkg))
    assert rec.carries_baseline and rec.has_output_schema and rec.output == str(exported / "nightly" / "scene.zarr")
    assert pyogrio.read_info(gpkg)["layer_metadata"][ORIGIN_KEY] == rec.output
    assert [str(n) for n in pyogrio.list_layers(gpkg)[:, 0]] == ["segments"]
    copy = zarr.open_group(extract_baseline(str(gpkg), str(tmp_path)), mode="r")
    output = zarr.open_group(str(exported / "nightly" / "scene.zarr"), mode="r")
    np.testing.assert_array_equal(copy["0"][:], output["0"][:])
    assert copy.attrs["segpipe"] == output.attrs["segpipe"]
    if shutil.which("ogrinfo"):  # GDAL 3.6 (Debian's gdal-bin, as QGIS 3.22 LTR): one layer, no warning
        p = subprocess.run(["ogrinfo", "-so", str(gpkg)], capture_output=True, text=True, check=True)
        assert "1: segments (Polygon)" in p.stdout and "2:" not in p.stdout and "Warning" not in p.stderr
