"""The CPU forward by runtime: segpipe's predictor in fp32 through torch and through ONNX Runtime, same windows.

    python benchmarks/runtime.py --side 1152 --batch 2 --repeats 5 [--model M] [--json docs/bench-runtime.json]

Both predictors are segpipe's own (``Predictor`` with ``--runtime torch`` and ``--runtime onnx``, fp32, the
worker's thread sizing), fed the same uint8 windows, alternating call by call so that a busy machine slows
both alike; the figures are the ratio of the medians and that of the fastest calls. Also reports the share
of equal labels (vacuous with the random model, which predicts nearly one class: pass ``--model`` a trained
one, e.g. the demo's) and, with
``--spin``, ONNX Runtime with its pool threads spinning (its default) for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=1152, help="Window side (a 1,024 tile + 64 halo: 1,152).")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=None, help="A model artifact [default: a random Unet-resnet18].")
    ap.add_argument("--threads", type=int, default=None, help="Forward threads [default: the worker's sizing].")
    ap.add_argument("--spin", action="store_true", help="Also ONNX Runtime with spinning pool threads.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from segpipe.core.settings import InferenceSettings
    from segpipe.engine.predictor import Predictor
    from segpipe.engine.runtime import cpu_supports_bf16
    from segpipe.models.artifact import create_artifact, load_artifact

    model = args.model
    if model is None:
        model = str(Path(tempfile.mkdtemp(prefix="segpipe-runtime-")) / "model")
        create_artifact(model, "Unet", "resnet18", ["a", "b", "c", "d"], seed=0)
    art = load_artifact(model)
    preds = {rt: Predictor(art, InferenceSettings(device="cpu", precision="fp32", runtime=rt), threads=args.threads)
             for rt in ("torch", "onnx")}
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (args.batch, art.spec.in_channels, args.side, args.side), dtype=np.uint8)
    labels = {rt: p.predict(tiles)[0] for rt, p in preds.items()}  # warm-up: first call, session start
    if args.spin:
        from segpipe.engine import runtime

        options = runtime.session_options

        def spinning(threads: int):
            so = options(threads)
            so.add_session_config_entry("session.intra_op.allow_spinning", "1")
            return so

        runtime.session_options = spinning  # type: ignore[assignment]
        preds["onnx_spinning"] = Predictor(art, InferenceSettings(device="cpu", precision="fp32", runtime="onnx"),
                                           threads=args.threads)
        labels["onnx_spinning"] = preds["onnx_spinning"].predict(tiles)[0]  # the session starts here, spinning
        runtime.session_options = options  # type: ignore[assignment]
    times: dict[str, list[float]] = {rt: [] for rt in preds}
    for _ in range(args.repeats):
        for rt, p in preds.items():
            t0 = time.perf_counter()
            p.predict(tiles)
            times[rt].append(time.perf_counter() - t0)
    mp = args.batch * args.side**2 / 1e6
    med = {rt: statistics.median(t) for rt, t in times.items()}
    result = {
        "side": args.side, "batch": args.batch, "repeats": args.repeats, "model": model,
        "cpu_native_bf16": cpu_supports_bf16(), "threads": preds["torch"].cpu.torch if preds["torch"].cpu else None,
        "mp_per_s": {rt: round(mp / m, 3) for rt, m in med.items()},
        "speedup_vs_torch_fp32": {rt: round(med["torch"] / m, 3) for rt, m in med.items() if rt != "torch"},
        # on a shared machine the fastest call is the least disturbed one: the ratio of the minimums beside
        "speedup_vs_torch_fp32_best": {rt: round(min(times["torch"]) / min(t), 3) for rt, t in times.items()
                                       if rt != "torch"},
        "seconds": {rt: [round(x, 3) for x in t] for rt, t in times.items()},
        "labels_equal_vs_torch": {rt: float((lab == labels["torch"]).mean()) for rt, lab in labels.items()
                                  if rt != "torch"},
    }
    for p in preds.values():
        p.close()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
