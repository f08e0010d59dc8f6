"""napari (through the napari-ome-zarr plugin) shows an output with the class colours, nodata transparent.

Skipped where napari or napari-ome-zarr is not installed. The layer checks need no display
(the plugin's reader and a ``Labels`` layer work without Qt); the screenshot check needs a
real X display with OpenGL (run pytest under ``xvfb-run -a``) and is skipped without one.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="napari is not installed (pip install 'napari[pyqt5]' napari-ome-zarr)")
pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr is not installed (pip install napari-ome-zarr)")


@pytest.fixture(scope="module")
def output(tmp_path_factory, scene_tif, model_dir, client) -> str:
    from tests.helpers import segment_to_zarr

    return segment_to_zarr(scene_tif, model_dir, tmp_path_factory.mktemp("napari"), client)


def _read(output: str) -> tuple[list, dict, str]:
    from napari_ome_zarr._reader import napari_get_reader

    reader = napari_get_reader(output)
    assert reader is not None, "napari-ome-zarr does not recognise the output"
    layers = reader(output)
    assert len(layers) == 1, [m.get("name") for _, m, _ in layers]
    return layers[0]


def _rgba(layer, value: int) -> list[int]:
    return np.round(np.asarray(layer.colormap.map(np.array([value]))).reshape(-1)[:4] * 255).astype(int).tolist()


@pytest.mark.slow
def test_napari_shows_class_colours_and_transparent_nodata(output):
    import zarr

    from segpipe.core.classes import palette_rgba

    data, meta, kind = _read(output)
    assert kind == "labels"
    seg = zarr.open_group(output, mode="r").attrs["segpipe"]
    assert [d.shape for d in data] == [(433, 389), (217, 195), (109, 98)]  # the whole pyramid, lazily
    layer = napari.layers.Labels(data, **meta)
    assert layer.multiscale
    for i, rgba in enumerate(palette_rgba(len(seg["classes"]), seg["class_colors"])):
        assert _rgba(layer, i) == rgba.tolist()
    assert _rgba(layer, seg["nodata_label"])[3] == 0  # transparent
    names = dict(zip(meta["properties"]["index"], meta["properties"]["class"]))
    assert [names[i] for i in range(len(seg["classes"]))] == seg["classes"]


@pytest.mark.slow
def test_napari_layer_is_visible_and_named_after_the_image(output):
    _, meta, _ = _read(output)
    assert meta["visible"] is True
    assert "scene" in meta["name"]


@pytest.mark.slow
def test_napari_renders_the_class_colours(output):
    if not os.environ.get("DISPLAY"):
        pytest.skip("no X display: run under xvfb-run -a to check what napari draws")
    import zarr

    from segpipe.core.classes import palette_rgba

    seg = zarr.open_group(output, mode="r").attrs["segpipe"]
    viewer = napari.Viewer(show=True)
    try:
        viewer.open(output, plugin="napari-ome-zarr")
        layer = viewer.layers[0]
        layer.visible, layer.opacity = True, 1.0
        viewer.reset_view()
        shot = viewer.screenshot(canvas_only=True, flash=False)
    finally:
        viewer.close()
    colours = {tuple(int(v) for v in p) for p in np.unique(shot.reshape(-1, shot.shape[-1])[:, :3], axis=0)}
    for rgba in palette_rgba(len(seg["classes"]), seg["class_colors"]):
        assert tuple(int(v) for v in rgba[:3]) in colours
