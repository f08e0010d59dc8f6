"""The model's resolution: resampled reads, model.json ``resolution``, segment at the model's pixel size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from segpipe.core.geometry import Window
from segpipe.io.readers import open_image
from segpipe.io.readers.resample import GridReader
from tests.helpers import write_geotiff


def test_resampled_reads_are_area_averages_and_nearest_labels(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 250, (3, 120, 90), dtype=np.uint8)
    path = write_geotiff(tmp_path / "a.tif", a, pixel=0.25)
    with open_image(str(path), gsd=0.5) as r:
        assert (r.info.height, r.info.width) == (60, 45) and r.info.transform[0] == 0.5
        assert r.info.grid.pixel_size == 0.5 and r.info.grid.scale == 2.0
        want = np.rint(a.reshape(3, 60, 2, 45, 2).astype(np.float64).mean(axis=(2, 4))).astype(np.uint8)
        np.testing.assert_array_equal(r.read(Window(0, 0, 60, 45)), want)
        np.testing.assert_array_equal(r.read(Window(7, 3, 20, 11)), want[:, 7:27, 3:14])  # any window
    with open_image(str(path)) as base:
        grid = base.info.grid.at_scale(3.0)
        with GridReader(base, grid, 3.0, 3.0, labels=True) as r:  # class ids: the centre pixel
            np.testing.assert_array_equal(r.read(Window(0, 0, 40, 30)), a[:, 1::3, 1::3])
    with open_image(str(path), gsd=0.375) as r:  # a factor between overviews
        assert (r.info.height, r.info.width) == (80, 60)
        got = r.read(Window(0, 0, 80, 60)).astype(np.float64)
        assert abs(got.mean() - a.mean()) < 0.5  # area averaging keeps the mean


def test_open_image_at_a_ground_sample_distance(tmp_path):
    a = np.zeros((3, 64, 64), np.uint8)
    path = write_geotiff(tmp_path / "g.tif", a, pixel=0.25)
    with open_image(str(path), gsd=0.5) as r:
        assert (r.info.height, r.info.width) == (32, 32)
    with open_image(str(path), gsd=0.252) as r:  # the same pixel size (within 2 %): read as it is
        assert not isinstance(r, GridReader) and r.info.grid.is_native
    photo = write_geotiff(tmp_path / "p.tif", a, crs=None)
    from segpipe.core.errors import InputError

    with pytest.raises(InputError, match="has no georeference"):
        open_image(str(photo), gsd=0.5)


def _with_resolution(model_dir: str, tmp: Path, **resolution) -> str:
    out = tmp / f"model-{'-'.join(f'{k}{v}' for k, v in resolution.items())}"
    shutil.copytree(model_dir, out)
    spec = json.loads((out / "model.json").read_text())
    spec["resolution"] = resolution
    (out / "model.json").write_text(json.dumps(spec))
    return str(out)


@pytest.mark.slow
def test_segment_reads_images_at_the_models_resolution(tmp_path, photo, model_dir):
    from click.testing import CliRunner

    from segpipe.cli.main import main

    src = tmp_path / "src"
    src.mkdir()
    write_geotiff(src / "fine.tif", photo[:, :200, :160], pixel=0.25)
    write_geotiff(src / "coarse.tif", photo[:, :100, :80], pixel=1.0)
    model = _with_resolution(model_dir, tmp_path, gsd=0.5)
    common = ["--chunk-size", "64", "--halo", "16", "--precision", "fp32", "--no-progress"]
    r = CliRunner().invoke(main, ["segment", str(src), "--model", model, "--out", str(tmp_path / "o"), *common])
    assert r.exit_code == 0, r.output
    fine = zarr.open_group(str(tmp_path / "o" / "fine.zarr"), mode="r")
    assert fine["0"].shape == (100, 80)  # 0.25 m pixels read at the model's 0.5 m
    seg = fine.attrs["segpipe"]
    assert seg["settings"]["gsd"] == 0.5 and seg["transform"][0] == 0.5
    # evaluation scores such an output against the full-size truth read at the prediction's pixel size
    from segpipe.core.classes import nodata_label
    from segpipe.evaluate.evaluation import score_output

    truth = np.random.default_rng(1).integers(0, 4, (1, 200, 160), dtype=np.uint8)
    write_geotiff(tmp_path / "truth.tif", truth, pixel=0.25)
    k = len(json.loads(Path(model, "model.json").read_text())["classes"])
    cm = score_output(str(tmp_path / "o" / "fine.zarr"), str(tmp_path / "truth.tif"), k)
    pred = fine["0"][:]
    want = np.zeros((k, k), np.int64)
    t = truth[0, 1::2, 1::2].astype(np.int64)  # nearest: the source pixel under each output pixel's centre
    keep = pred != nodata_label(k)
    np.add.at(want, (t[keep], pred[keep].astype(np.int64)), 1)
    np.testing.assert_array_equal(cm.matrix, want)
    coarse = zarr.open_group(str(tmp_path / "o" / "coarse.zarr"), mode="r")
    assert coarse["0"].shape == (200, 160)  # upsampled, with a warning line
    assert f"note: {src}/coarse.tif: its pixels (1 CRS units per pixel) are coarser than the model's (0.5)" in r.stderr
    # --gsd (or --level/--mpp) overrides the model's resolution
    r = CliRunner().invoke(main, ["segment", str(src / "fine.tif"), "--model", model, "--out", str(tmp_path / "n"),
                                  "--gsd", "0.25", *common])
    assert r.exit_code == 0, r.output
    assert zarr.open_array(str(tmp_path / "n" / "fine.zarr" / "0"), mode="r").shape == (200, 160)
    # a photo without georeference is read as it is by a model with a gsd
    photo_dir = tmp_path / "photos"
    photo_dir.mkdir()
    write_geotiff(photo_dir / "p.tif", photo[:, :64, :64], crs=None)
    r = CliRunner().invoke(main, ["segment", str(photo_dir), "--model", model, "--out", str(tmp_path / "p"), *common])
    assert r.exit_code == 0, r.output
    assert zarr.open_array(str(tmp_path / "p" / "p.zarr" / "0"), mode="r").shape == (64, 64)


def test_training_records_the_resolution_of_its_images(tmp_path):
    from segpipe.labels.dataset import load_dataset
    from segpipe.train.resolution import dataset_resolution
    from segpipe.train.synthetic import PIXEL_SIZE, write_dataset

    data = write_dataset(tmp_path / "d", 2, 64, seed=1)
    res = dataset_resolution(load_dataset(str(data)))
    assert res is not None and res.gsd == PIXEL_SIZE and res.mpp is None


def test_a_dataset_at_a_resolution_reads_resampled_images_and_truth(tmp_path):
    from segpipe.core.errors import DatasetError
    from segpipe.labels.dataset import at_resolution, load_dataset, open_item_image, open_mask
    from segpipe.labels.truth import open_truth
    from segpipe.train.synthetic import write_dataset

    data = write_dataset(tmp_path / "d", 2, 96, seed=2)  # 0.5 m pixels
    ds = at_resolution(load_dataset(str(data)), gsd=1.0)
    item = ds.items[0]
    assert (item.grid.scale, item.height, item.width) == (2.0, 48, 48)
    with open_item_image(item) as img, open_truth(ds, item) as truth:
        assert img.read(Window(0, 0, 48, 48)).shape == (3, 48, 48)
        with open_mask(item.mask_uri) as full:
            np.testing.assert_array_equal(truth.read(Window(0, 0, 48, 48))[0],
                                          full.read(Window(0, 0, 96, 96))[0, 1::2, 1::2])
    with pytest.raises(DatasetError, match="coarser than the 0.25 asked"):
        at_resolution(load_dataset(str(data)), gsd=0.25)
    with pytest.raises(DatasetError, match="records no microns per pixel"):
        at_resolution(load_dataset(str(data)), mpp=0.5)


@pytest.mark.slow
def test_training_at_a_chosen_resolution_is_recorded_and_segment_follows_it(tmp_path):
    from segpipe.models.artifact import load_artifact
    from segpipe.train.loop import train
    from segpipe.train.settings import train_settings
    from segpipe.train.synthetic import write_dataset

    data = write_dataset(tmp_path / "d", 3, 128, seed=3)  # 0.5 m pixels, trained at 1 m
    s = train_settings(epochs=1, batch_size=4, patch_size=32, patches_per_epoch=8, device="cpu", precision="fp32",
                       gsd=1.0)
    result = train(str(data), str(tmp_path / "m"), s, progress=False)
    assert result.history[-1]["val_mean_iou"] is not None  # validation read the val image at 1 m
    assert load_artifact(str(tmp_path / "m")).spec.resolution.gsd == 1.0
    from click.testing import CliRunner

    from segpipe.cli.main import main

    image = sorted((data / "images").glob("*.tif"))[0]
    r = CliRunner().invoke(main, ["segment", str(image), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                                  "--chunk-size", "32", "--halo", "8", "--precision", "fp32", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert zarr.open_array(str(tmp_path / "o" / f"{image.stem}.zarr" / "0"), mode="r").shape == (64, 64)
