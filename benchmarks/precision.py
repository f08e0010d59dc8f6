"""bf16 vs fp32: label agreement and mean IoU of a trained model on a generated scene with exact truth.

    python benchmarks/precision.py --model demo-output/registry --side 2048
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=321)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import zarr

    from segpipe.core.settings import InferenceSettings, SegmentSettings
    from segpipe.engine.cluster import dask_client
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.evaluate.evaluation import score_output
    from segpipe.io.storage import list_images
    from segpipe.train.synthetic import write_scene
    from segpipe.train.synthetic_scene import CLASSES

    work = Path(tempfile.mkdtemp(prefix="segpipe-precision-"))
    (work / "img").mkdir()
    scene = write_scene(work / "img" / "scene.tif", args.side, args.side, args.seed, mask_path=work / "mask.tif")
    ref, _ = check_model(args.model)
    out: dict = {}
    labels = {}
    with dask_client() as client:
        for prec in ("fp32", "bf16"):
            s = SegmentSettings(inference=InferenceSettings(precision=prec))
            r = segment_image(list_images(str(scene))[0], ref, str(work / prec), s, client)
            labels[prec] = zarr.open_array(r.output + "/0", mode="r")[:]
            m = score_output(r.output, str(work / "mask.tif"), len(CLASSES)).scores(list(CLASSES))
            out[prec] = {"mean_iou": m["mean_iou"], "pixel_accuracy": m["pixel_accuracy"], "seconds": round(r.seconds, 1)}
    out["agreement"] = float((labels["fp32"] == labels["bf16"]).mean())
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
