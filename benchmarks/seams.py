"""Seams: agreement of tiled labels with one whole-image forward pass, for several halos.

    python benchmarks/seams.py --model demo-output/registry --side 1024 --chunk-size 256

The whole-image pass sees the image reflect-padded by the largest halo, like the tiled
windows, so image borders get the same context and only seams can differ. Writes a
Markdown table (docs/halo.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Artifact, registry (champion) or REGISTRY@vN.")
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--halos", default="0,16,32,64,128")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    import zarr

    from segpipe.core.geometry import Window
    from segpipe.core.settings import InferenceSettings, SegmentSettings, TilingSettings
    from segpipe.engine.cluster import dask_client
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.readers import open_image
    from segpipe.io.storage import list_images
    from segpipe.train.synthetic import write_scene

    work = Path(tempfile.mkdtemp(prefix="segpipe-seams-"))
    scene = write_scene(work / "scene.tif", args.side, args.side, seed=args.seed)
    ref, art = check_model(args.model)
    net = art.network()
    with open_image(str(scene)) as r:
        img = r.read(Window(0, 0, args.side, args.side)).astype(np.float32)
    halos = [int(h) for h in args.halos.split(",")]
    m = max(max(halos), 32)
    m = -(-m // 32) * 32
    padded = np.pad(img, ((0, 0), (m, m), (m, m)), mode="reflect")
    mean = torch.tensor(art.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(art.spec.std).view(1, -1, 1, 1)
    with torch.inference_mode():
        whole = net((torch.from_numpy(padded)[None] / art.spec.input_scale - mean) / std).argmax(1)[0].numpy()
    whole = whole[m:-m, m:-m]
    rows = []
    with dask_client() as client:
        for halo in halos:
            s = SegmentSettings(tiling=TilingSettings(chunk_size=args.chunk_size, halo=halo),
                                inference=InferenceSettings(precision=args.precision))
            res = segment_image(list_images(str(scene))[0], ref, str(work / f"h{halo}"), s, client)
            tiled = zarr.open_array(res.output + "/0", mode="r")[:]
            rows.append({"halo": halo, "agreement": float((tiled == whole).mean()),
                         "tile": s.tiling.chunk_size + 2 * halo})
    print(f"model {ref.uri} ({ref.spec.architecture}/{ref.spec.encoder}), scene {args.side}², "
          f"chunk {args.chunk_size}, {args.precision}")
    print("| halo | window | agreement with whole-image pass |\n|--:|--:|--:|")
    for r in rows:
        print(f"| {r['halo']} | {r['tile']} | {100 * r['agreement']:.3f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
