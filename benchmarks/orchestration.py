"""Orchestration overhead: the ``segment-images`` flow vs the bare library call, same folder.

    python benchmarks/orchestration.py --large 2 --large-side 2048 --small 40 --small-side 256

Both run as whole processes on the embedded Dask cluster, side by side in one invocation:
``segpipe segment`` (library, no Prefect) and the flow against a real local Prefect server
(started here on 127.0.0.1 and stopped by PID). Reports wall times, the difference, and the
overhead as a fraction plus fixed seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure  # noqa: E402

FLOW_SNIPPET = """
import sys, json
sys.path.insert(0, {root!r})
from flows.segment import segment_images
rows = segment_images(source={src!r}, model={model!r}, out={out!r}, precision={precision!r})
print(json.dumps([r["status"] for r in rows]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", type=int, default=2)
    ap.add_argument("--large-side", type=int, default=2048)
    ap.add_argument("--small", type=int, default=40)
    ap.add_argument("--small-side", type=int, default=256)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from segpipe.models.artifact import create_artifact
    from segpipe.train.synthetic import write_scene
    from tests.services import prefect_server

    work = Path(tempfile.mkdtemp(prefix="segpipe-orch-"))
    src = work / "src"
    (src / "small").mkdir(parents=True)
    for i in range(args.large):
        write_scene(src / f"large-{i}.tif", args.large_side, args.large_side, seed=i)
    for i in range(args.small):
        write_scene(src / "small" / f"s{i:03d}.tif", args.small_side, args.small_side, seed=100 + i)
    model = work / "model"
    create_artifact(str(model), "Unet", "resnet18", ["a", "b", "c", "d", "e"], seed=0)
    py = sys.executable
    results = {"images": args.large + args.small,
               "megapixels": round((args.large * args.large_side**2 + args.small * args.small_side**2) / 1e6, 2)}
    lib_t, flow_t = [], []
    with prefect_server(work / "prefect") as env:
        for _ in range(args.repeats):
            shutil.rmtree(work / "out-lib", ignore_errors=True)
            lib = measure([py, "-m", "segpipe.cli.main", "segment", str(src), "--model", str(model), "--out",
                           str(work / "out-lib"), "--precision", args.precision, "--no-progress"], env=dict(os.environ))
            assert lib.returncode == 0, lib.stderr[-2000:]
            lib_t.append(lib.seconds)
            shutil.rmtree(work / "out-flow", ignore_errors=True)
            code = FLOW_SNIPPET.format(root=str(ROOT), src=str(src), model=str(model), out=str(work / "out-flow"),
                                       precision=args.precision)
            fl = measure([py, "-c", code], env=env)
            assert fl.returncode == 0, fl.stderr[-2000:]
            flow_t.append(fl.seconds)
    lib_s, flow_s = sorted(lib_t)[len(lib_t) // 2], sorted(flow_t)[len(flow_t) // 2]
    results.update({"library_seconds": round(lib_s, 2), "flow_seconds": round(flow_s, 2),
                    "overhead_seconds": round(flow_s - lib_s, 2),
                    "overhead_fraction": round((flow_s - lib_s) / lib_s, 4)})
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
