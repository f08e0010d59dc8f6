"""Small images share Dask tasks (engine.groups): outputs identical chunk for chunk with and without sharing,
when images overlap in flight and when two runs share the tasks; each chunk written once; a failing image
fails alone."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import write_geotiff, write_jpeg, write_png


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photo) -> Path:
    """Small images of several kinds and sizes (reflection at every edge, a nodata mask), and two that are
    not small at tile 128 (more than one tile: tasks of their own)."""
    src = tmp_path_factory.mktemp("smalls") / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    for i in range(10):
        h, w = (int(v) for v in rng.integers(40, 129, 2))
        y, x = int(rng.integers(0, photo.shape[1] - h)), int(rng.integers(0, photo.shape[2] - w))
        write_png(src / f"chip{i:02d}.png", np.ascontiguousarray(photo[:, y:y + h, x:x + w]))
    write_jpeg(src / "j.jpg", np.ascontiguousarray(photo[:, :100, :90]))
    write_geotiff(src / "g.tif", np.ascontiguousarray(photo[:, 50:170, 60:150]))
    masked = np.ascontiguousarray(photo[:, :96, :120])
    masked[:, :40, :50] = 0
    write_geotiff(src / "m.tif", masked, nodata=0)
    write_png(src / "wide.png", np.ascontiguousarray(photo[:, :90, :200]))  # two tiles
    write_geotiff(src / "big.tif", np.ascontiguousarray(photo[:, :300, :280]))  # 3 × 3 tiles
    return src


def _settings(**kw):
    from segpipe.core.settings import segment_settings

    return segment_settings(chunk_size=64, halo=16, tile_size=128, device="cpu", precision="fp32", **kw)


def _arrays(out: Path, complete_only: bool = False) -> dict[str, dict[str, bytes]]:
    """Every output under ``out`` (``complete_only``: the complete ones; else all must be complete): every
    array's every chunk, decoded (level 0, pyramid levels, uncertainty)."""
    import zarr

    found: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("*.zarr")):
        group = zarr.open_group(str(path), mode="r")
        if complete_only and group.attrs["segpipe"]["status"] != "complete":
            continue
        assert group.attrs["segpipe"]["status"] == "complete", path
        chunks: dict[str, bytes] = {}
        for name, arr in group.arrays():
            cs = arr.chunks
            grid = [range(-(-n // c)) for n, c in zip(arr.shape, cs)]
            for idx in np.ndindex(*(len(g) for g in grid)):
                sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, cs))
                chunks[f"{name}/{'.'.join(map(str, idx))}"] = np.asarray(arr[sel]).tobytes()
        found[path.name] = chunks
    return found


class Recorder:
    """Chunk writes per (output, chunk) and the images of each shared task, in this process."""

    def __init__(self, monkeypatch) -> None:
        from segpipe.engine import groups, tasks

        self.writes: list[tuple[str, tuple[int, int]]] = []
        self.shared: list[list[str]] = []
        self._lock = threading.Lock()
        write, launch = tasks.write_chunk, groups.SharedTasks._launch

        def counting(target, chunk, labels, probs=None):
            with self._lock:
                self.writes.append((target.uri, chunk.key))
            return write(target, chunk, labels, probs)

        def recording(pool, items):
            with self._lock:
                self.shared.append([Path(it.job.source).name for it in items])
            return launch(pool, items)

        monkeypatch.setattr(tasks, "write_chunk", counting)
        monkeypatch.setattr(groups.SharedTasks, "_launch", recording)

    def clear(self) -> None:
        self.writes.clear()
        self.shared.clear()

    def each_chunk_once(self, results) -> None:
        assert len(self.writes) == len(set(self.writes))
        for r in results:
            mine = [k for uri, k in self.writes if uri == r.output]
            assert len(mine) == r.chunks, r.output  # every chunk of every image, once


def test_outputs_identical_with_and_without_shared_tasks(folder, model_dir, tmp_path, monkeypatch, client):
    """The reference runs one image at a time with no shared task; then small images share tasks (one shared
    task at a time, so they pile up into it), many images in flight, and two runs at once on one cluster
    whose small images share tasks across the runs. Same chunks, same uncertainty, each chunk written once."""
    from segpipe.engine import groups, segment

    rec = Recorder(monkeypatch)
    settings = _settings()
    with monkeypatch.context() as m:
        m.setattr(segment, "is_small", lambda *a: False)
        alone = segment.segment_many([str(folder)], model_dir, str(tmp_path / "alone"), settings, client,
                                     max_concurrent_images=1)
    assert all(r.status == "done" for r in alone), [r.error for r in alone]
    assert rec.shared == []
    rec.each_chunk_once(alone)
    ref = _arrays(tmp_path / "alone")
    assert len(ref) == 15 and len({c for chunks in ref.values() for c in chunks.values()}) > 20

    rec.clear()
    with monkeypatch.context() as m:
        m.setattr(groups, "shared_slots", lambda threads, share: 1)  # one shared task at a time: they fill up
        shared = segment.segment_many([str(folder)], model_dir, str(tmp_path / "shared"), settings, client)
    assert all(r.status == "done" for r in shared), [r.error for r in shared]
    rec.each_chunk_once(shared)
    carried = sorted(n for names in rec.shared for n in names)
    assert carried == sorted(p.name for p in folder.iterdir() if p.name not in ("wide.png", "big.tif"))
    assert max(len(names) for names in rec.shared) > 1  # several images in one task
    assert all(bool(r.extra.get("shared_task")) == (Path(r.source).name not in ("wide.png", "big.tif"))
               for r in shared)
    assert _arrays(tmp_path / "shared") == ref

    rec.clear()
    runs: dict[str, list] = {}

    def run(name: str) -> None:
        runs[name] = segment.segment_many([str(folder)], model_dir, str(tmp_path / name), settings, client)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for name in ("first", "second"):
        assert all(r.status == "done" for r in runs[name]), [r.error for r in runs[name]]
        rec.each_chunk_once(runs[name])
        assert _arrays(tmp_path / name) == ref, name
    for name in ("first", "second"):  # provenance: each output its own run, nothing of the other's
        for r in runs[name]:
            seg = json.loads((Path(r.output) / "zarr.json").read_text())["attributes"]["segpipe"]
            assert seg["source"] == r.source and seg["status"] == "complete"


def test_a_failing_image_fails_alone_in_a_shared_task(folder, model_dir, tmp_path, monkeypatch, client):
    """A truncated chip (bad input: one line) and a chip whose tile work hits a bug share tasks with good
    ones: those two fail with their own line, never marked complete; the others finish as if alone."""
    import shutil

    from segpipe.engine import groups, segment

    src = tmp_path / "src"
    shutil.copytree(folder, src)
    good = (src / "chip01.png").read_bytes()
    (src / "chip01.png").write_bytes(good[: len(good) // 2])
    real = groups.run_tiles

    def buggy(job, work, fill=False):
        if job.source.endswith("chip02.png"):
            raise ValueError("boom")
        return real(job, work, fill)

    rec = Recorder(monkeypatch)
    monkeypatch.setattr(groups, "run_tiles", buggy)
    monkeypatch.setattr(groups, "shared_slots", lambda threads, share: 1)
    # the buggy chip must share its task with a good one: the collector holds the first task until chip02's
    # work waits beside another image's (without the hold, chip02 could go alone when the images' timing
    # left nothing else waiting; a backstop lets the run go on after 20 s)
    ready, t0 = groups.SharedTasks._ready, time.monotonic()

    def held(pool):
        names = {Path(it.job.source).name for items in pool._pending.values() for it in items}
        if not rec.shared and ("chip02.png" not in names or len(names) < 2) and time.monotonic() - t0 < 20:
            return None
        return ready(pool)

    monkeypatch.setattr(groups.SharedTasks, "_ready", held)
    results = segment.segment_many([str(src)], model_dir, str(tmp_path / "out"), _settings(), client)
    by_name = {Path(r.source).name: r for r in results}
    cut, bug = by_name.pop("chip01.png"), by_name.pop("chip02.png")
    assert cut.status == "failed" and "corrupt or truncated" in cut.error and str(src / "chip01.png") in cut.error
    assert bug.status == "failed" and bug.error == f"{src / 'chip02.png'}: unexpected ValueError: boom"
    for r in (cut, bug):
        seg = json.loads((Path(r.output) / "zarr.json").read_text())["attributes"]["segpipe"]
        assert seg["status"] != "complete"
    assert all(r.status == "done" for r in by_name.values()), [r.error for r in by_name.values()]
    assert any({"chip01.png", "chip02.png"} & set(names) and len(names) > 1 for names in rec.shared)
    alone = tmp_path / "alone"
    with monkeypatch.context() as m:
        m.setattr(segment, "is_small", lambda *a: False)
        for name in ("chip00.png", "chip03.png", "g.tif", "big.tif"):
            [r] = segment.segment_many([str(folder / name)], model_dir, str(alone), _settings(), client)
            assert r.status == "done", r.error
    got = _arrays(tmp_path / "out", complete_only=True)
    assert {k: got[k] for k in ("chip00.zarr", "chip03.zarr", "g.zarr", "big.zarr")} == _arrays(alone)


class _FakeFuture:
    def __init__(self) -> None:
        self.status = "pending"
        self.callbacks: list = []
        self.value = None

    def add_done_callback(self, fn) -> None:
        self.callbacks.append(fn)

    def finish(self, value) -> None:
        self.status, self.value = "finished", value
        for fn in self.callbacks:
            fn(self)

    def result(self):
        return self.value

    def release(self) -> None:
        pass


class _FakeClient:
    def __init__(self) -> None:
        self.futures: list[tuple[list, _FakeFuture]] = []

    def submit(self, fn, items, **kw):
        fut = _FakeFuture()
        self.futures.append((items, fut))
        return fut


def _job(name: str):
    from types import SimpleNamespace

    return SimpleNamespace(source=name, target=SimpleNamespace(run_id="0123456789", uri=name),
                           model=SimpleNamespace(sha256="w"), inference=SimpleNamespace(device="cpu"))


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_shared_work_is_withdrawn_before_its_task_and_waited_for_after():
    """The fence for shared tasks: an image that gives up withdraws its work while no task carries it yet;
    once a task started with it, cancelling waits until that task ended (it cannot be stopped for one
    image, and no task may write an image's chunks after its lock is released)."""
    from segpipe.engine.groups import SharedTasks

    pool, client = SharedTasks(), _FakeClient()
    first = pool.submit(client, _job("a"), [((0, 0), [(0, 0)])], None, slots=1)
    _wait(lambda: len(client.futures) == 1)  # a slot was free: it went at once, alone
    waiting = [pool.submit(client, _job(n), [((0, 0), [(0, 0)])], None, slots=1) for n in "bcd"]
    time.sleep(0.1)
    assert len(client.futures) == 1  # no free slot: they wait for the next task
    waiting[0].cancel()  # not carried yet: withdrawn at once
    assert waiting[0].status == "cancelled"

    done = threading.Event()
    threading.Thread(target=lambda: (first.cancel(), done.set()), daemon=True).start()
    time.sleep(0.2)
    assert not done.is_set()  # its task runs: cancel waits for it
    client.futures[0][1].finish([{"chunks": 1}])
    assert done.wait(5) and first.status == "finished" and first.result() == {"chunks": 1}
    _wait(lambda: len(client.futures) == 2)  # the slot is free: the two left go together, without the withdrawn one
    assert [job.source for job, _ in client.futures[1][0]] == ["c", "d"]
    client.futures[1][1].finish([{"chunks": 1}, {"raised": ValueError("x"), "traceback": "tb"}])
    assert waiting[1].status == "finished" and waiting[2].status == "error"
    assert isinstance(waiting[2].exception(), ValueError)
