"""segpipe.io.output: the output Zarr contract, module by module (no model, no Dask).

prepare_output creates the arrays (chunk grid, dtype, fill value = nodata label); write_chunk puts
exactly one chunk key per chunk (edge chunks padded), readable through zarr; finalize marks the
output complete and keeps everything else; inspect_output tells what is at a path, and nothing that
is not a segpipe output is ever touched.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from numcodecs import Zstd

from segpipe.core.errors import OutputError
from segpipe.core.geometry import ChunkGrid
from segpipe.io.output import (
    FORMAT,
    LEVEL0,
    PROBABILITIES,
    OutputTarget,
    done_chunks,
    finalize,
    inspect_output,
    ome_attrs,
    open_labels,
    prepare_output,
    read_attrs,
    write_chunk,
)


def target(path: Path, h: int, w: int, chunk: int, classes: int, probabilities: bool = False,
           zstd_level: int = 3) -> OutputTarget:
    # a fresh run id each time: write_chunk keeps one open store per (uri, run id)
    return OutputTarget(str(path), h, w, chunk, classes, probabilities, uuid.uuid4().hex, zstd_level)


def attrs_for(t: OutputTarget, **extra) -> dict:
    names = [f"c{i}" for i in range(t.num_classes)]
    return {"ome": ome_attrs("img", names, None, None),
            "segpipe": {"format": FORMAT, "run_id": t.run_id, "status": "running", "height": t.height,
                        "width": t.width, **extra}}


def chunk_files(uri: str, array: str = LEVEL0) -> list[str]:
    root = Path(uri, array, "c")
    return sorted(str(p.relative_to(Path(uri))) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ----------------------------------------------------------------------------- prepare_output


@pytest.mark.parametrize(
    ("classes", "dtype", "nodata"),
    [(1, "uint8", 255), (4, "uint8", 255), (255, "uint8", 255), (256, "uint16", 65535), (1000, "uint16", 65535)],
)
def test_prepare_output_creates_level0(tmp_path, classes, dtype, nodata):
    t = target(tmp_path / "o.zarr", 100, 70, 32, classes)
    assert (t.label_dtype, t.nodata_label) == (dtype, nodata)
    prepare_output(t, attrs_for(t))
    g = zarr.open_group(t.uri, mode="r")
    a = g[LEVEL0]
    assert a.shape == (100, 70) and a.chunks == (32, 32) and a.dtype == np.dtype(dtype)
    assert a.fill_value == nodata
    assert a.metadata.dimension_names == ("y", "x")
    meta = json.loads(Path(t.uri, LEVEL0, "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd"]
    assert meta["codecs"][1]["configuration"]["level"] == 3
    assert PROBABILITIES not in g
    # nothing written yet: reads give the nodata label everywhere, no chunk exists
    assert (a[:] == nodata).all() and chunk_files(t.uri) == [] and done_chunks(t.uri) == set()
    assert g.attrs["segpipe"]["status"] == "running" and g.attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
    assert inspect_output(t.uri).kind == "segpipe"


def test_prepare_output_probabilities_array(tmp_path):
    t = target(tmp_path / "p.zarr", 50, 40, 16, 3, probabilities=True, zstd_level=7)
    prepare_output(t, attrs_for(t))
    g = zarr.open_group(t.uri, mode="r")
    p = g[PROBABILITIES]
    assert p.shape == (3, 50, 40) and p.chunks == (1, 16, 16) and p.dtype == np.uint8 and p.fill_value == 0
    assert p.metadata.dimension_names == ("class", "y", "x")
    assert json.loads(Path(t.uri, LEVEL0, "zarr.json").read_text())["codecs"][1]["configuration"]["level"] == 7


def test_prepare_output_refuses_what_it_must_not_touch(tmp_path):
    # an existing segpipe output without replace: refused, left as it was
    t = target(tmp_path / "seg.zarr", 20, 20, 16, 2)
    prepare_output(t, attrs_for(t))
    write_chunk(t, ChunkGrid(20, 20, 16).chunk(0, 0), np.ones((16, 16), np.uint8))
    before = chunk_files(t.uri)
    again = target(tmp_path / "seg.zarr", 20, 20, 16, 2)
    with pytest.raises(OutputError, match="was created by another run meanwhile; it was left untouched"):
        prepare_output(again, attrs_for(again), replace=False)
    assert chunk_files(t.uri) == before == ["0/c/0/0"]
    assert read_attrs(t.uri)["segpipe"]["run_id"] == t.run_id

    # a foreign folder (even one holding a Zarr group): refused, untouched, with replace too
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w", zarr_format=3).attrs["segpipe"] = {"format": "someone-else/1"}
    for path in (foreign, other):
        snapshot = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
        for replace in (False, True):
            t2 = target(path, 20, 20, 16, 2)
            with pytest.raises(OutputError, match=r"exists and is not a segpipe output \(a folder\); it was left untouched"):
                prepare_output(t2, attrs_for(t2), replace=replace)
        assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == snapshot

    # a file: refused, untouched
    f = tmp_path / "file.zarr"
    f.write_bytes(b"not a folder")
    t3 = target(f, 20, 20, 16, 2)
    with pytest.raises(OutputError, match=r"is not a segpipe output \(a file\)"):
        prepare_output(t3, attrs_for(t3), replace=True)
    assert f.read_bytes() == b"not a folder"


def test_prepare_output_replace_starts_over(tmp_path):
    t = target(tmp_path / "seg.zarr", 20, 20, 16, 2)
    prepare_output(t, attrs_for(t, note="old"))
    write_chunk(t, ChunkGrid(20, 20, 16).chunk(1, 1), np.ones((4, 4), np.uint8))
    assert done_chunks(t.uri) == {(1, 1)}
    new = target(tmp_path / "seg.zarr", 20, 20, 8, 300)
    prepare_output(new, attrs_for(new), replace=True)
    assert done_chunks(t.uri) == set() and chunk_files(t.uri) == []
    a = open_labels(t.uri)
    assert a.chunks == (8, 8) and a.dtype == np.uint16
    seg = read_attrs(t.uri)["segpipe"]
    assert seg["run_id"] == new.run_id and "note" not in seg


# ----------------------------------------------------------------------------- inspect_output


def test_inspect_output_kinds(tmp_path):
    assert inspect_output(str(tmp_path / "missing.zarr")).kind == "none"
    (tmp_path / "f").write_text("x")
    assert inspect_output(str(tmp_path / "f")).kind == "file"
    (tmp_path / "empty").mkdir()
    assert inspect_output(str(tmp_path / "empty")).kind == "foreign"
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    plain.attrs["hello"] = 1
    e = inspect_output(str(tmp_path / "plain.zarr"))
    assert e.kind == "foreign" and e.attrs == {"hello": 1} and e.provenance == {}
    (tmp_path / "bad.zarr").mkdir()
    (tmp_path / "bad.zarr" / "zarr.json").write_text("{not json")
    assert inspect_output(str(tmp_path / "bad.zarr")).kind == "foreign"
    t = target(tmp_path / "seg.zarr", 10, 10, 16, 2)
    prepare_output(t, attrs_for(t))
    e = inspect_output(t.uri)
    assert e.kind == "segpipe" and e.provenance["run_id"] == t.run_id and e.provenance["format"] == FORMAT
    assert inspect_output("file://" + t.uri).kind == "segpipe"


# ----------------------------------------------------------------------------- write_chunk

# (height, width, chunk, classes, probabilities)
WRITE_CASES = [
    (64, 64, 32, 4, False),  # whole chunks only
    (70, 45, 32, 4, False),  # edge chunks on both sides
    (33, 1, 32, 4, True),  # a 1-pixel-wide column
    (1, 1, 16, 2, True),  # one pixel
    (50, 37, 16, 300, False),  # uint16 class ids
    (20, 30, 16, 256, True),  # uint16 with probabilities
]


@pytest.mark.parametrize(("h", "w", "chunk", "classes", "probs"), WRITE_CASES)
def test_write_chunk_writes_exactly_its_key(tmp_path, h, w, chunk, classes, probs):
    t = target(tmp_path / "o.zarr", h, w, chunk, classes, probabilities=probs)
    prepare_output(t, attrs_for(t))
    rng = np.random.default_rng(h * w)
    dtype = np.dtype(t.label_dtype)
    labels = rng.integers(0, classes, (h, w)).astype(dtype)
    p = rng.integers(0, 256, (classes if probs else 0, h, w)).astype(np.uint8) if probs else None
    grid = ChunkGrid(h, w, chunk)
    written: set[tuple[int, int]] = set()
    zstd = Zstd()
    for c in grid:
        before = set(chunk_files(t.uri))
        core = labels[c.y0:c.y0 + c.h, c.x0:c.x0 + c.w]
        write_chunk(t, c, core, None if p is None else p[:, c.y0:c.y0 + c.h, c.x0:c.x0 + c.w])
        written.add(c.key)
        assert set(chunk_files(t.uri)) - before == {f"0/c/{c.iy}/{c.ix}"}  # exactly this chunk's key
        assert done_chunks(t.uri) == written
        # the stored chunk is the full chunk shape, the core padded with the nodata label
        raw = np.frombuffer(zstd.decode(Path(t.uri, LEVEL0, "c", str(c.iy), str(c.ix)).read_bytes()),
                            dtype=dtype.newbyteorder("<")).reshape(chunk, chunk)
        np.testing.assert_array_equal(raw[:c.h, :c.w], core)
        assert (raw[c.h:, :] == t.nodata_label).all() and (raw[:, c.w:] == t.nodata_label).all()
    a = open_labels(t.uri)
    assert a.dtype == dtype
    np.testing.assert_array_equal(a[:], labels)  # read back through zarr
    assert a[h - 1, w - 1] == labels[h - 1, w - 1]
    if probs:
        got = zarr.open_group(t.uri, mode="r")[PROBABILITIES][:]
        np.testing.assert_array_equal(got, p)
        assert sorted(chunk_files(t.uri, PROBABILITIES)) == sorted(
            f"{PROBABILITIES}/c/{k}/{c.iy}/{c.ix}" for k in range(classes) for c in grid)


def test_write_chunk_of_only_nodata_still_leaves_its_key(tmp_path):
    """write_empty_chunks: an all-nodata (= fill value) chunk is still a completion record."""
    t = target(tmp_path / "o.zarr", 40, 40, 16, 3)
    prepare_output(t, attrs_for(t))
    grid = ChunkGrid(40, 40, 16)
    write_chunk(t, grid.chunk(0, 0), np.full((16, 16), 255, np.uint8))
    write_chunk(t, grid.chunk(2, 2), np.full((8, 8), 255, np.uint8))
    assert done_chunks(t.uri) == {(0, 0), (2, 2)}
    assert (open_labels(t.uri)[:] == 255).all()


def test_fallback_path_also_leaves_keys_of_nodata_chunks(tmp_path):
    from zarr.codecs import BloscCodec

    uri = str(tmp_path / "o.zarr")
    t = target(tmp_path / "o.zarr", 20, 30, 16, 4)
    g = zarr.open_group(uri, mode="w-", zarr_format=3)
    g.create_array(LEVEL0, shape=(20, 30), chunks=(16, 16), dtype="uint8", compressors=BloscCodec(), fill_value=255,
                   config={"write_empty_chunks": True})
    grid = ChunkGrid(20, 30, 16)
    write_chunk(t, grid.chunk(0, 1), np.ones((16, 14), np.uint8))
    write_chunk(t, grid.chunk(1, 0), np.full((4, 16), 255, np.uint8))
    np.testing.assert_array_equal(open_labels(uri)[:16, 16:], 1)  # the fallback writes through zarr
    assert done_chunks(uri) == {(0, 1), (1, 0)}


def test_write_chunk_into_a_missing_output_is_an_error(tmp_path):
    t = target(tmp_path / "gone.zarr", 10, 10, 16, 2)
    with pytest.raises((OutputError, FileNotFoundError)):
        write_chunk(t, ChunkGrid(10, 10, 16).chunk(0, 0), np.zeros((10, 10), np.uint8))


# ----------------------------------------------------------------------------- finalize


def test_finalize_marks_complete_and_keeps_other_attrs(tmp_path):
    t = target(tmp_path / "o.zarr", 20, 20, 16, 2)
    attrs = attrs_for(t, source="a.tif", classes=["c0", "c1"], chunks=99)
    prepare_output(t, attrs)
    write_chunk(t, ChunkGrid(20, 20, 16).chunk(0, 0), np.zeros((16, 16), np.uint8))
    assert inspect_output(t.uri).provenance["status"] == "running"
    finalize(t.uri, {"segpipe": {"chunks": 4, "seconds": 1.5}, "extra": {"k": 1}})
    got = read_attrs(t.uri)
    seg = got["segpipe"]
    assert seg["status"] == "complete" and seg["finished"]
    assert seg["chunks"] == 4 and seg["seconds"] == 1.5  # new values win
    assert {k: seg[k] for k in ("format", "run_id", "source", "classes", "height", "width")} == \
        {k: attrs["segpipe"][k] for k in ("format", "run_id", "source", "classes", "height", "width")}
    assert got["ome"] == json.loads(json.dumps(attrs["ome"]))  # untouched
    assert got["extra"] == {"k": 1}
    assert inspect_output(t.uri).kind == "segpipe"
    # the data is untouched too
    assert done_chunks(t.uri) == {(0, 0)} and (open_labels(t.uri)[:16, :16] == 0).all()
    # a status in the attrs passed cannot undo completion
    finalize(t.uri, {"segpipe": {"status": "running"}})
    assert read_attrs(t.uri)["segpipe"]["status"] == "complete"


def test_ome_attrs_list_the_nodata_label_transparent():
    for classes, nodata in ((["a", "b"], 255), ([f"c{i}" for i in range(300)], 65535)):
        ome = ome_attrs("x", classes, None, 0.25)
        colors = ome["image-label"]["colors"]
        assert [c["label-value"] for c in colors] == [*range(len(classes)), nodata]
        assert colors[-1]["rgba"] == [0, 0, 0, 0] and all(c["rgba"][3] == 255 for c in colors[:-1])
        props = ome["image-label"]["properties"]
        assert props[-1] == {"label-value": nodata, "class": "nodata"} and props[0]["class"] == classes[0]
        ds = ome["multiscales"][0]["datasets"]
        assert ds == [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.25, 0.25]}]}]
        assert {a.get("unit") for a in ome["multiscales"][0]["axes"]} == {"micrometer"}


def test_no_temporary_files_are_left(tmp_path):
    t = target(tmp_path / "o.zarr", 40, 40, 16, 2, probabilities=True)
    prepare_output(t, attrs_for(t))
    for c in ChunkGrid(40, 40, 16):
        write_chunk(t, c, np.zeros((c.h, c.w), np.uint8), np.zeros((2, c.h, c.w), np.uint8))
    leftovers = [n for _, _, files in os.walk(t.uri) for n in files if ".tmp" in n]
    assert leftovers == []


def test_the_write_path_falls_back_only_for_a_layout_that_is_not_plain(tmp_path, caplog):
    """One write path: segpipe's own layout is written chunk by chunk (RawChunks); only an array whose
    layout differs (here blosc) goes through zarr-python, and says why; a missing array is an error."""
    import logging

    from zarr.codecs import BloscCodec

    from segpipe.io.output import _store_for

    plain = target(tmp_path / "plain.zarr", 20, 30, 16, 4)
    prepare_output(plain, attrs_for(plain))
    assert _store_for(plain).fast and _store_for(plain).fallback is None
    other = target(tmp_path / "blosc.zarr", 20, 30, 16, 4)
    zarr.open_group(other.uri, mode="w-", zarr_format=3).create_array(
        LEVEL0, shape=(20, 30), chunks=(16, 16), dtype="uint8", compressors=BloscCodec(), fill_value=255)
    with caplog.at_level(logging.INFO, logger="segpipe.io.output"):
        store = _store_for(other)
    assert not store.fast and store.fallback.startswith("array '0': codecs ['bytes', 'blosc']")
    assert f"{other.uri}: array '0': codecs" in caplog.text and "written through zarr-python" in caplog.text
    gone = target(tmp_path / "o.zarr", 20, 30, 16, 4)
    prepare_output(gone, attrs_for(gone))
    (tmp_path / "o.zarr" / LEVEL0 / "zarr.json").unlink()
    with pytest.raises(OutputError, match="has no array '0'"):
        write_chunk(gone, ChunkGrid(20, 30, 16).chunk(0, 0), np.zeros((16, 16), np.uint8))


def test_uncertainty_array_is_plain_zarr_written_without_zarr_python(tmp_path):
    """The uncertainty array is written straight into the store (segpipe's plain layout: zarr-python reads it),
    NaN where not computed, read back the same, and replaced when the chunk grid's shape changed."""
    from segpipe.io.chunks import RawChunks
    from segpipe.io.uncertainty import UNCERTAINTY, read_uncertainty, uncertainty_attrs, write_uncertainty

    uri = str(tmp_path / "u.zarr")
    assert read_uncertainty(uri) is None
    values = np.full((300, 5), np.nan, np.float32)
    values[0, 0], values[299, 4] = 0.25, 1.0
    write_uncertainty(uri, values, 512)
    arr = zarr.open_array(f"{uri}/{UNCERTAINTY}", mode="r")
    assert arr.shape == (300, 5) and arr.chunks == (256, 5) and arr.dtype == np.float32
    assert dict(arr.attrs)["segpipe"] == uncertainty_attrs(512)
    np.testing.assert_array_equal(arr[...], values)  # NaN where not computed
    np.testing.assert_array_equal(read_uncertainty(uri), values)
    assert RawChunks.open(uri, UNCERTAINTY) is not None  # the plain layout
    values[1, 1] = 0.5
    write_uncertainty(uri, values, 512)  # rewritten in place
    np.testing.assert_array_equal(read_uncertainty(uri), values)
    write_uncertainty(uri, np.zeros((2, 3), np.float32), 512)  # another grid: replaced, no stale chunks
    np.testing.assert_array_equal(zarr.open_array(f"{uri}/{UNCERTAINTY}", mode="r")[...], np.zeros((2, 3)))
    assert sorted(p.name for p in (tmp_path / "u.zarr" / UNCERTAINTY / "c").iterdir()) == ["0"]
