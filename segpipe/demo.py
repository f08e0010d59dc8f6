"""``segpipe demo``: the whole loop on generated data, in minutes, on a laptop.

1. generate a synthetic aerial-like land-cover dataset (5 classes, exact masks, imbalance)
2. run the ``retrain`` flow: train a challenger for a time budget, evaluate, register, promote (no champion yet)
3. generate a large scene (4,096 × 4,096 by default) with its true mask
4. run the ``segment-images`` flow over it with the registry's champion → Zarr
5. score the scene output against its mask, write a report and a preview
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segpipe.io.storage import join


@dataclass(frozen=True)
class DemoSizes:
    images: int
    image_side: int
    epochs: int
    patches_per_epoch: int
    patch_size: int
    batch_size: int
    scene_side: int
    chunk_size: int
    halo: int
    #: training's time budget (validation included): the epochs and the schedule are fitted to it, so the
    #: demo takes minutes on a CPU without native bf16 (fp32, ~4× slower) as on one with it
    train_seconds: float | None = None
    lr: float = 1e-3  #: peak learning rate (a short one-cycle schedule learns faster with a higher peak)

    @classmethod
    def full(cls) -> DemoSizes:
        # short epochs (20 steps): the first measures the pace early, and the budget is cut finely
        return cls(images=16, image_side=512, epochs=24, patches_per_epoch=160, patch_size=256, batch_size=8,
                   scene_side=4096, chunk_size=512, halo=64, train_seconds=400.0, lr=2e-3)

    @classmethod
    def quick(cls) -> DemoSizes:
        return cls(images=4, image_side=160, epochs=1, patches_per_epoch=16, patch_size=64, batch_size=4,
                   scene_side=700, chunk_size=128, halo=16)


def run_demo(out: str, *, quick: bool = False, seed: int = 0, precision: str = "auto",
             echo: Callable[[str], None] = print) -> dict:
    """Run the demo into ``out``; returns the paths and figures it printed.

    ``precision`` is training's and segmentation's (``auto``: bf16 where the CPU has it natively; set
    ``SEGPIPE_CPU_BF16=0`` to run as on a CPU without it: fp32, and ONNX Runtime for the forward).
    """

    from segpipe.core.settings import segment_settings
    from segpipe.engine.cluster import dask_client
    from segpipe.engine.segment import segment_many
    from segpipe.evaluate.evaluation import score_output
    from segpipe.evaluate.reports import markdown_table, write_report
    from segpipe.evaluate.retrain import retrain
    from segpipe.export import export_preview
    from segpipe.io.metrics import write_metrics_json
    from segpipe.train.settings import TrainSettings
    from segpipe.train.synthetic import write_dataset, write_scene
    from segpipe.train.synthetic_scene import CLASS_COLORS, CLASSES

    sizes = DemoSizes.quick() if quick else DemoSizes.full()
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def step(name: str, t: float) -> None:
        times[name] = round(time.perf_counter() - t, 1)
        echo(f"[{time.perf_counter() - t0:6.1f} s] {name} done in {times[name]} s")

    t = time.perf_counter()
    data = write_dataset(root / "data", sizes.images, sizes.image_side, seed)
    step("dataset", t)

    t = time.perf_counter()
    registry = str(root / "registry")
    tsettings = TrainSettings(architecture="Unet", encoder="resnet18", epochs=sizes.epochs,
                              batch_size=sizes.batch_size, patch_size=sizes.patch_size,
                              patches_per_epoch=sizes.patches_per_epoch, class_balanced=True, seed=seed,
                              max_seconds=sizes.train_seconds, precision=precision, lr=sizes.lr)
    ssettings = segment_settings(chunk_size=sizes.chunk_size, halo=sizes.halo, precision=precision)
    retrained = retrain(str(data), registry, tsettings, ssettings, workdir=str(root / "runs"), margin=0.0).as_dict()
    step("retrain (train, evaluate, register, promote)", t)

    t = time.perf_counter()
    scene_dir, truth_dir = root / "scene", root / "scene-truth"
    scene_dir.mkdir(exist_ok=True)
    truth_dir.mkdir(exist_ok=True)
    scene = write_scene(scene_dir / "scene.tif", sizes.scene_side, sizes.scene_side, seed + 1000,
                        mask_path=truth_dir / "scene.tif")
    step(f"scene {sizes.scene_side}×{sizes.scene_side}", t)

    t = time.perf_counter()
    masks = root / "masks"
    with dask_client() as client:
        results = segment_many([str(scene_dir)], registry, str(masks), ssettings, client)
    rows = [r.as_dict() for r in results]
    step("segment", t)

    t = time.perf_counter()
    output = join(str(masks), "scene.zarr")
    metrics = score_output(output, str(truth_dir / "scene.tif"), len(CLASSES)).scores(list(CLASSES))
    eval_dir = root / "scene-eval"
    write_metrics_json(str(eval_dir / "metrics.json"), metrics)
    write_report(eval_dir, metrics, title=f"demo scene {sizes.scene_side}×{sizes.scene_side}",
                 model_info={"registry": registry, "champion": retrained["champion"]},
                 class_colors=list(CLASS_COLORS))
    preview = export_preview(output, str(root / "scene-preview.png"), source=str(scene))
    step("evaluate scene", t)

    summary = {
        "seconds": round(time.perf_counter() - t0, 1), "steps": times,
        "validation_mean_iou": retrained["challenger_mean_iou"], "scene_mean_iou": metrics["mean_iou"],
        "scene_pixel_accuracy": metrics["pixel_accuracy"], "registry": registry,
        "champion": retrained["champion"], "retrain_report": retrained["report"],
        "scene_output": output, "scene_report": str(eval_dir / "report.html"), "preview": preview,
        "segment_mp_per_s": rows[0]["mp_per_s"] if rows else None,
        "precision": _recorded_precision(output),
    }
    echo("")
    echo(markdown_table(metrics))
    echo("")
    for key in ("validation_mean_iou", "scene_mean_iou", "seconds", "precision", "registry", "champion", "retrain_report",
                "scene_output", "scene_report", "preview"):
        echo(f"{key:>20}: {summary[key]}")
    import json

    (root / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _recorded_precision(output: str) -> str:
    """How the scene's labels were computed, as its output records it (e.g. ``fp32 (onnx)``)."""
    from segpipe.io.output import read_attrs

    inference = ((read_attrs(output) or {}).get("segpipe") or {}).get("inference") or {}
    return f"{inference.get('precision')} ({inference.get('runtime', 'torch')})"
