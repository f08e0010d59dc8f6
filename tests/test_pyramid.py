"""Pyramid levels: 2×2 mode/mean against brute force, chunked levels == in-memory levels, NGFF metadata."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from segpipe.core.errors import ConfigError, OutputError
from segpipe.engine.pyramid import (
    build_probability_pyramid,
    build_pyramid,
    downsample_mean,
    downsample_mode,
    level_path,
    level_shapes,
    level_transforms,
)

# ----------------------------------------------------------------------------- references


def brute_mode(labels: np.ndarray) -> np.ndarray:
    """Mode of every (possibly partial) 2×2 block, ties → lowest id, one block at a time."""
    h, w = labels.shape
    out = np.zeros(((h + 1) // 2, (w + 1) // 2), dtype=np.int64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            counts = Counter(labels[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel().tolist())
            top = max(counts.values())
            out[i, j] = min(v for v, c in counts.items() if c == top)
    return out


def brute_mean(values: np.ndarray) -> np.ndarray:
    h, w = values.shape
    out = np.zeros(((h + 1) // 2, (w + 1) // 2), dtype=np.int64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = values[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].astype(np.float64)
            out[i, j] = int(np.floor(block.mean() + 0.5))
    return out


def make_output(path, labels: np.ndarray, chunk: int, probabilities: np.ndarray | None = None) -> str:
    """An output group following the Zarr contract (level 0 only), written directly with zarr."""
    group = zarr.open_group(str(path), mode="w")
    arr = group.create_array(
        "0", shape=labels.shape, chunks=(chunk, chunk), dtype=labels.dtype,
        compressors=ZstdCodec(level=9), dimension_names=["y", "x"], fill_value=0,
    )
    arr[:] = labels
    if probabilities is not None:
        p = group.create_array(
            "probabilities", shape=probabilities.shape, chunks=(1, chunk, chunk), dtype="uint8",
            compressors=ZstdCodec(level=9), dimension_names=["c", "y", "x"], fill_value=0,
        )
        p[:] = probabilities
    k = int(labels.max()) + 1
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "name": "test",
            "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}],
        }],
        "image-label": {
            "colors": [{"label-value": i, "rgba": [40 * i, 255 - 40 * i, 0, 255]} for i in range(k)],
            "properties": [{"label-value": i, "class": f"class{i}"} for i in range(k)],
        },
    }
    group.attrs["segpipe"] = {"source": "synthetic", "height": labels.shape[0], "width": labels.shape[1],
                              "chunk_size": chunk, "halo": 0, "classes": [f"class{i}" for i in range(k)],
                              "crs_wkt": None, "transform": None, "mpp": None, "status": "complete"}
    return str(path)


def blobby_labels(h: int, w: int, k: int, seed: int) -> np.ndarray:
    """Class regions with structure (so the mode is not decided by ties alone) plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    labels = ((yy // 37 + xx // 53) % k).astype(np.uint8)
    noise = rng.random((h, w)) < 0.2
    labels[noise] = rng.integers(0, k, int(noise.sum()), dtype=np.uint8)
    return labels


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 3), (4, 5), (7, 6), (9, 11), (16, 16)])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_mode_matches_brute_force(shape: tuple[int, int], k: int) -> None:
    rng = np.random.default_rng(shape[0] * 100 + shape[1] * 10 + k)
    for _ in range(5):
        labels = rng.integers(0, k, shape).astype(np.uint8)
        np.testing.assert_array_equal(downsample_mode(labels, k), brute_mode(labels))


def test_mode_ties_go_to_the_lowest_class() -> None:
    labels = np.array([[3, 1, 2, 2, 5],
                       [1, 3, 0, 1, 4]], dtype=np.uint8)
    # blocks: {3,1,1,3} tie 2-2 → 1; {2,2,0,1} → 2; partial {5,4} tie 1-1 → 4
    np.testing.assert_array_equal(downsample_mode(labels, 6), [[1, 2, 4]])
    # four different values → lowest
    np.testing.assert_array_equal(downsample_mode(np.array([[9, 7], [8, 6]], np.uint8), 10), [[6]])


def test_mode_more_than_255_classes_is_uint16() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(250, 300, (9, 8)).astype(np.uint16)
    out = downsample_mode(labels, 300)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, brute_mode(labels))
    assert downsample_mode(labels.astype(np.uint8), 255).dtype == np.uint8
    assert downsample_mode(labels, 256).dtype == np.uint16  # 255 is the nodata label of uint8
    # the nodata label (the highest value) loses a 2-2 tie against a class
    np.testing.assert_array_equal(downsample_mode(np.array([[255, 3], [3, 255]], np.uint8), 4), [[3]])
    with pytest.raises(ConfigError):
        downsample_mode(labels, 0)


def test_mode_leading_axes_are_independent() -> None:
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 4, (3, 7, 9)).astype(np.uint8)
    out = downsample_mode(stack, 4)
    for i in range(3):
        np.testing.assert_array_equal(out[i], brute_mode(stack[i]))


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (5, 5), (8, 7)])
def test_mean_matches_brute_force(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    values = rng.integers(0, 256, shape).astype(np.uint8)
    np.testing.assert_array_equal(downsample_mean(values), brute_mean(values))
    np.testing.assert_array_equal(downsample_mean(np.full((3, 3), 255, np.uint8)), np.full((2, 2), 255))


@pytest.mark.parametrize(
    ("size", "min_size", "expected"),
    [
        ((100, 80), 256, [(100, 80)]),
        ((257, 10), 256, [(257, 10), (129, 5)]),
        ((1500, 1100), 256, [(1500, 1100), (750, 550), (375, 275), (188, 138)]),
        ((1, 1), 1, [(1, 1)]),
        ((5, 3), 1, [(5, 3), (3, 2), (2, 1), (1, 1)]),
    ],
)
def test_level_shapes(size: tuple[int, int], min_size: int, expected: list[tuple[int, int]]) -> None:
    assert level_shapes(*size, min_size) == expected


def test_level_paths_and_transforms() -> None:
    assert [level_path("0", L) for L in range(3)] == ["0", "1", "2"]
    assert level_path("probabilities", 2) == "probabilities_2"
    assert level_transforms([1.0, 1.0], [0.0, 0.0], 3) == [
        {"type": "scale", "scale": [8.0, 8.0]}, {"type": "translation", "translation": [3.5, 3.5]},
    ]
    # physical level-0 scale: centres of 2×2 blocks of 0.5-unit pixels sit 0.25 units in
    assert level_transforms([0.5, 0.5], [10.0, 0.0], 1)[1]["translation"] == [10.25, 0.25]


# ----------------------------------------------------------------------------- chunked pyramid


def reference_levels(labels: np.ndarray, k: int, min_size: int) -> list[np.ndarray]:
    levels = [labels]
    while max(levels[-1].shape) > min_size:
        levels.append(downsample_mode(levels[-1], k))
    return levels


def test_pyramid_levels_equal_in_memory_reference(tmp_path) -> None:
    labels = blobby_labels(1500, 1100, 5, seed=3)
    uri = make_output(tmp_path / "out.zarr", labels, chunk=256)
    paths = build_pyramid(uri, num_classes=5)
    ref = reference_levels(labels, 5, 256)
    assert paths == ["1", "2", "3"]
    group = zarr.open_group(uri, mode="r")
    for level, expected in enumerate(ref[1:], start=1):
        arr = group[str(level)]
        assert arr.shape == expected.shape
        assert arr.chunks == (256, 256)
        assert arr.compressors == group["0"].compressors
        assert arr.metadata.dimension_names == ("y", "x")
        np.testing.assert_array_equal(arr[:], expected)
    # the reference is itself right: level 1 against the brute-force mode on a corner
    np.testing.assert_array_equal(ref[1][:40, :40], brute_mode(labels[:80, :80]))

    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2", "3"]
    for level, d in enumerate(datasets[1:], start=1):
        assert d["coordinateTransformations"] == level_transforms([1.0, 1.0], [0.0, 0.0], level)
    assert group.attrs["segpipe"]["status"] == "complete"  # other attrs are untouched


def test_pyramid_min_size_and_rebuild(tmp_path) -> None:
    labels = blobby_labels(300, 200, 3, seed=4)
    uri = make_output(tmp_path / "small.zarr", labels, chunk=64)
    assert build_pyramid(uri, num_classes=3, min_size=100) == ["1", "2"]
    assert build_pyramid(uri, num_classes=3) == ["1", "2", "3"]  # rebuild overwrites and extends
    datasets = zarr.open_group(uri).attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(zarr.open_group(uri)["3"][:], reference_levels(labels, 3, 64)[3])


def test_pyramid_of_a_missing_array_is_one_line_error(tmp_path) -> None:
    uri = make_output(tmp_path / "o.zarr", np.zeros((10, 10), np.uint8), chunk=16)
    with pytest.raises(OutputError, match="no array 'nope'"):
        build_pyramid(uri, array="nope", num_classes=2)
    with pytest.raises(OutputError):
        build_pyramid(str(tmp_path / "missing.zarr"), num_classes=2)


def test_probability_pyramid_equals_in_memory_mean(tmp_path) -> None:
    rng = np.random.default_rng(5)
    labels = blobby_labels(333, 270, 3, seed=5)
    probs = rng.integers(0, 256, (3, 333, 270)).astype(np.uint8)
    uri = make_output(tmp_path / "p.zarr", labels, chunk=64, probabilities=probs)
    paths = build_probability_pyramid(uri)
    assert paths == ["probabilities_1", "probabilities_2", "probabilities_3"]
    group = zarr.open_group(uri, mode="r")
    expected = probs
    for path in paths:
        expected = downsample_mean(expected)
        arr = group[path]
        assert arr.chunks == (1, 64, 64)
        np.testing.assert_array_equal(arr[:], expected)
    np.testing.assert_array_equal(group["probabilities_1"][1], brute_mean(probs[1]))
    assert group.attrs["segpipe"]["probability_levels"] == ["probabilities", *paths]
    # the label multiscales are not touched by the probability pyramid
    assert [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]] == ["0"]


def test_pyramid_on_a_dask_client_equals_local(tmp_path) -> None:
    from distributed import Client, LocalCluster

    labels = blobby_labels(700, 520, 4, seed=6)
    uri = make_output(tmp_path / "d.zarr", labels, chunk=128)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            paths = build_pyramid(uri, num_classes=4, client=client)
    group = zarr.open_group(uri, mode="r")
    for path, expected in zip(paths, reference_levels(labels, 4, 128)[1:]):
        np.testing.assert_array_equal(group[path][:], expected)


# ----------------------------------------------------------------------------- ome-zarr-py


def test_ome_zarr_reader_reads_levels_and_labels(tmp_path, caplog) -> None:
    """ome-zarr-py 0.18 reads NGFF 0.5 on Zarr v3 (``FormatV05``): levels, transforms, colours, names."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    labels = blobby_labels(600, 500, 4, seed=7)
    uri = make_output(tmp_path / "ome.zarr", labels, chunk=128)
    build_pyramid(uri, num_classes=4)
    location = parse_url(uri)
    assert location is not None and location.fmt.version == "0.5"
    with caplog.at_level(logging.ERROR, logger="ome_zarr"):  # "no parent image" warning is expected
        nodes = list(Reader(location)())
    node = nodes[0]
    assert {type(s) for s in node.specs} >= {Multiscales, Label}
    ref = reference_levels(labels, 4, 128)
    assert [tuple(d.shape) for d in node.data] == [r.shape for r in ref]
    for data, expected in zip(node.data, ref):
        np.testing.assert_array_equal(np.asarray(data), expected)
    assert node.metadata["coordinateTransformations"][2][0] == {"type": "scale", "scale": [4.0, 4.0]}
    assert node.metadata["properties"][3] == {"class": "class3"}
    assert node.metadata["color"][1] == [40 / 255, 215 / 255, 0.0, 1.0]
