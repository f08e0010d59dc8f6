"""The chaos run: the nightly deployment over a flaky bucket, with a worker killed mid-run.

    python benchmarks/chaos.py --images 24 --side 384 --rate 0.03 --json docs/bench-chaos.json

Real parts, all on 127.0.0.1 and stopped by PID: moto's S3 server behind the fault-injecting proxy
(:class:`tests.services.FaultProxy`), a Prefect server, ``deployments/serve.py`` serving the nightly
deployment, and a ``dask scheduler`` with worker processes. The images go to ``s3://chaos/in/``; a clean
run (``segpipe segment``, no faults) writes ``s3://chaos/clean``; then ``prefect deployment run
segment-images/nightly`` writes ``s3://chaos/out`` on the Dask cluster while the proxy fails ``--rate`` of
all bucket requests (500, 502, 503, 504, 403s that clear on the next try, connection resets, time-outs),
and worker 0 is SIGKILLed once a share of the chunks is written.

The storage clients keep their own retries, as a deployment has them (botocore's, GDAL's; s3fs and GDAL
read time-outs set below the proxy's hold, so a time-out is one): most 5xx, resets and time-outs pass
there; 403s, faults that outlast them and those during a write come up to segpipe, which retries them
with its policy (``segpipe.core.retry``) and counts them in each image's row.

Checked and reported: the run ends Completed; every output equals the clean run's, chunk object for
chunk object, at every level; no lock is left; the log names the retries. Figures: requests made,
faults injected by kind, segpipe's retries and the tasks recomputed after the lost worker (the flow's
summary artifact), wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import competing_classes_model, sample_photo, write_geotiff  # noqa: E402
from tests.services import BIN, dask_processes, faulty_s3, prefect_server, start, stop, wait_for  # noqa: E402

#: the faults injected, with their weights: not only 503s (which botocore retries anyway)
MIX = {"500": 1.0, "502": 1.0, "503": 1.0, "504": 1.0, "403": 2.0, "reset": 1.0, "timeout": 0.5}
SETTINGS = ["chunk_size=64", "halo=16", "precision=fp32", "device=cpu", "batch_size=2", "suggestions=5"]


def write_images(folder: Path, count: int, side: int) -> list[Path]:
    """``count`` distinct GeoTIFFs of ``side``² (shifted crops of the bundled photo), seeded by their index."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = sample_photo(side + 4 * count, side + 4 * count)
    return [write_geotiff(folder / f"im{i:02d}.tif", photo[:, 4 * i:4 * i + side, 2 * i:2 * i + side])
            for i in range(count)]


def chunk_objects(fs: Any, root: str, arrays: str = r"\d+") -> dict[str, bytes]:
    """The chunk objects of the arrays named by ``arrays`` (default: the class-id levels 0, 1, 2, …) of
    every output under ``root`` (keys relative to ``root``)."""
    keys = [k for k in fs.find(root) if re.search(rf"\.zarr/{arrays}/c/", k)]
    return {k[len(root):]: v for k, v in fs.cat(keys).items()} if keys else {}


def uncertainty_difference(fs: Any, clean: str, out: str) -> tuple[float, dict[str, int]]:
    """The largest difference between the two runs' per-chunk uncertainty values (float means over a
    chunk: summed in another order when tiles are batched differently, so compared, not hashed), and the
    number of chunks that have a value in one run only, by output."""
    import numpy as np
    import zarr

    worst, one_only = 0.0, {}
    for key in fs.glob(f"{clean}*.zarr"):
        name = key.rsplit("/", 1)[-1]
        a = zarr.open_array(f"s3://{clean}{name}/uncertainty", mode="r")[:]
        try:
            b = zarr.open_array(f"s3://{out}{name}/uncertainty", mode="r")[:]
        except FileNotFoundError:  # an output that failed before its first values were written
            b = np.full_like(a, np.nan)
        if (odd := np.isnan(a) != np.isnan(b)).any():
            one_only[name] = int(odd.sum())
        both = np.isfinite(a) & np.isfinite(b)
        worst = max(worst, float(np.abs(a - b)[both].max()) if both.any() else 0.0)
    return worst, one_only


def summary_rows(env: dict[str, str]) -> list[dict]:
    """The rows of the last ``segment-images-summary`` table artifact (the flow's per-image summary)."""
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> list[dict]:
        async with get_client() as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
                "segment-images-summary"])))
        data = max(arts, key=lambda a: a.created).data
        return json.loads(data) if isinstance(data, str) else data

    return asyncio.run(read())


def run_chaos(work: Path, images: int = 24, side: int = 384, rate: float = 0.03, kill: bool = True,
              workers: int = 2, seed: int = 0, kill_after: float = 0.3, model: str | None = None,
              gdal_threads: str | None = None, log: Any = print) -> dict[str, Any]:
    """One chaos run in ``work``; returns the figures (see the module docstring). Leaves nothing running.

    The clean run goes through ``segpipe segment --dask-address`` on the same cluster (its workers load
    the model once, for both runs), while the Prefect server starts and the deployment is served.

    ``gdal_threads`` sets ``GDAL_NUM_THREADS`` for every process (None: segpipe's own choice, one thread for
    remote sources). With ``"ALL_CPUS"`` GDAL 3.10's GTiff reads a remote window's tiles through one
    multi-range request that it never retries (OSGeo/gdal#12933, retried from GDAL's #13898 on): a single
    5xx or reset there reads as a "corrupt or truncated image" and fails the image for good.
    """
    t_start = time.monotonic()

    def step(what: str) -> None:
        log(f"{time.monotonic() - t_start:5.0f} s  {what}")

    paths = write_images(work / "src", images, side)
    model = model or str(competing_classes_model(work / "model", sample_photo(side, side)))
    total = sum(len(range(0, side, 64)) ** 2 for _ in paths)
    report: dict[str, Any] = {"images": images, "side": side, "chunks": total, "rate": rate, "workers": workers,
                              "seed": seed, "mix": MIX, "kill": kill}
    report["gdal_num_threads"] = gdal_threads or "segpipe's default (1 for remote sources)"
    saved = dict(os.environ)
    with faulty_s3(work / "logs", client_retries=True) as (aws, proxy):
        aws = {**aws, "GDAL_NUM_THREADS": gdal_threads} if gdal_threads else aws
        os.environ.update(aws)
        try:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            fs = s3fs.S3FileSystem()
            fs.mkdir("chaos")
            fs.put([str(p) for p in paths], [f"chaos/in/{p.name}" for p in paths])
            with dask_processes(workers, work / "logs", nthreads=1) as (address, procs):
                step("dask scheduler and workers started")
                t0 = time.monotonic()
                clean = start([sys.executable, "-m", "segpipe.cli.main", "segment", "s3://chaos/in/", "--model", model,
                               "--out", "s3://chaos/clean", "--chunk-size", "64", "--halo", "16", "--precision", "fp32",
                               "--device", "cpu", "--batch-size", "2", "--no-progress", "--dask-address", address],
                              dict(os.environ), work / "clean.log")
                with prefect_server(work / "prefect") as penv:
                    serve_env = {**penv, **aws}
                    serve = start([sys.executable, str(ROOT / "deployments" / "serve.py")], serve_env,
                                  work / "serve.log")
                    try:
                        if clean.wait(1800) != 0:
                            raise RuntimeError(f"the clean run failed: {(work / 'clean.log').read_text()[-2000:]}")
                        report["clean_seconds"] = round(time.monotonic() - t0, 1)
                        step("clean run done")

                        def registered() -> bool:
                            p = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=serve_env,
                                               capture_output=True, text=True)
                            return "nightly" in p.stdout

                        wait_for(registered, 180, "served deployments", serve)
                        step(f"deployment served; chaos run: {images} images, {total} chunks, {rate:.1%} of "
                             "requests failing")
                        requests0 = proxy.requests
                        proxy.injected.clear()
                        proxy.chaos(rate, MIX, seed=seed)
                        t0 = time.monotonic()
                        run = start([str(BIN / "prefect"), "deployment", "run", "segment-images/nightly",
                                     "-p", "source=s3://chaos/in/", "-p", f"model={model}", "-p",
                                     "out=s3://chaos/out", "-p", f"dask_address={address}",
                                     *[a for kv in SETTINGS for a in ("-p", kv)],
                                     "--watch", "--watch-timeout", "1700"], serve_env, work / "run.log")
                        killed_at = None
                        if kill:
                            def written() -> int:
                                return sum(1 for m, p, st in list(proxy.log)
                                           if m == "PUT" and st == 200 and re.search(r"^/chaos/out/.*\.zarr/0/c/", p))

                            wait_for(lambda: written() >= kill_after * total, 1500, "first chunks", run)
                            killed_at = written()
                            procs[0].send_signal(signal.SIGKILL)
                            step(f"worker 0 killed after {killed_at} of {total} chunks")
                        rc = run.wait(1800)
                        report["chaos_seconds"] = round(time.monotonic() - t0, 1)
                        proxy.chaos(0, {})
                        step("flow run ended")
                        report["killed_after_chunks"] = killed_at
                        report["requests"] = proxy.requests - requests0
                        report["faults"] = dict(sorted(proxy.injected.items()))
                        report["faults_total"] = sum(proxy.injected.values())
                        report["fault_rate"] = round(report["faults_total"] / max(report["requests"], 1), 4)
                        report["completed"] = rc == 0 and "Completed" in (work / "run.log").read_text(errors="replace")
                        rows = summary_rows(penv)
                    finally:
                        stop(serve)
            report["statuses"] = sorted({r["status"] for r in rows})
            report["storage_retries"] = sum(int(r.get("retries", 0)) for r in rows)
            report["recomputed"] = sum(int(r.get("recomputed", 0)) for r in rows)
            report["images_with_retries"] = sum(1 for r in rows if r.get("retries"))
            report["images_recomputed"] = sum(1 for r in rows if r.get("recomputed"))
            served = (work / "serve.log").read_text(errors="replace")
            report["log_lines_naming_retries"] = len(re.findall(r"storage fault\(s\) tried again", served))
            report["log_lines_naming_lost_worker"] = len(re.findall(r"ran again after a worker was lost", served))
            fs.invalidate_cache()
            a, b = chunk_objects(fs, "chaos/clean/"), chunk_objects(fs, "chaos/out/")
            report["chunk_objects"] = len(a)
            report["outputs_identical"] = bool(a) and a == b
            report["chunks_differing"] = sum(1 for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            worst, one_only = uncertainty_difference(fs, "chaos/clean/", "chaos/out/")
            report["uncertainty_max_difference"] = worst
            report["uncertainty_in_one_run_only"] = one_only
            report["locks_left"] = sum(1 for k in fs.find("chaos/out/") if k.endswith(".lock"))
            report["outputs_complete"] = sum(
                1 for k in fs.glob("chaos/out/*.zarr")
                if json.loads(fs.cat_file(f"{k}/zarr.json"))["attributes"]["segpipe"]["status"] == "complete")
            step("outputs compared")
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--side", type=int, default=384)
    ap.add_argument("--rate", type=float, default=0.03, help="share of bucket requests that fail")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-kill", action="store_true", help="keep every worker alive")
    ap.add_argument("--gdal-threads", default=None,
                    help="GDAL_NUM_THREADS for every process (default: segpipe's, 1 for remote sources; see run_chaos)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segpipe-chaos-"))
    try:
        report = run_chaos(work, args.images, args.side, args.rate, not args.no_kill, args.workers, args.seed,
                           gdal_threads=args.gdal_threads)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder: {work}")
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
