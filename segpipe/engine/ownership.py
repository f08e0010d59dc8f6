"""Who owns an output path, and what a run may do there.

Provenance written when an output is created; what changed since (source, model, settings, in words);
the decision new | skip | resume | replace | refuse; unique output names within a run.
Nothing here writes: see docs/outputs.md for the rules.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from segpipe import __version__
from segpipe.core.classes import class_colors, colors_from_spec, nodata_label
from segpipe.core.settings import SegmentSettings
from segpipe.engine.job import ModelRef
from segpipe.engine.tiled import TilePlan
from segpipe.io.output import (
    FORMAT,
    Existing,
    inspect_output,
    now_iso,
)
from segpipe.io.readers import ImageInfo
from segpipe.io.storage import SourceImage, output_uri
from segpipe.models.normalization import InputNorm

if TYPE_CHECKING:

    pass

def provenance(image: SourceImage, info: ImageInfo, model: ModelRef, settings: SegmentSettings,
               run_id: str, norm: InputNorm | None = None, merged_batches: bool = False) -> dict[str, Any]:
    """The ``segpipe`` root attributes written when an output is created.

    ``inference`` says how labels were computed: the resolved precision and runtime, and whether a chip's
    forward may be batched with chips of other images (GPU workers merge small requests): then
    under bf16/fp16 its labels can depend on which chips shared the batch, on a few pixels.
    """
    t = settings.tiling
    num_classes = model.spec.num_classes
    return {
        "format": FORMAT,
        "version": __version__,
        "source": image.uri,
        "source_fingerprint": image.fingerprint,
        **({"source_item": image.item.as_dict()} if image.item is not None else {}),
        "height": info.height,
        "width": info.width,
        "bands": list(settings.read.bands) if settings.read.bands else None,
        "chunk_size": t.chunk_size,
        "tile_size": TilePlan.of(t, info.height, info.width).tile_size,
        "halo": t.halo,
        "multiple_of": t.multiple_of,
        "settings_key": settings.output_key(),
        "settings": settings.output_settings(),
        "tta": settings.inference.tta,
        "inference": {"precision": settings.inference.precision, "runtime": settings.inference.runtime,
                      "merged_batches": merged_batches,
                      "labels_depend_on_batch": merged_batches and settings.inference.precision != "fp32"},
        "model": {**model.spec.core(), "uri": model.uri, "weights_sha256": model.sha256},
        "classes": model.spec.classes,
        "class_colors": class_colors(num_classes, colors_from_spec(model.spec.model_extra)),
        "nodata_label": nodata_label(num_classes),
        "background_class": settings.output.background_class,
        "crs_wkt": info.crs_wkt,
        "transform": list(info.transform) if info.transform else None,
        "mpp": info.mpp,
        # the pixels this output is on: evaluation, corrections and exports open the source and its truth on it
        "grid": info.grid.as_dict(),
        "reader": {"driver": info.driver, **info.extra},
        "input": {"dtype": info.dtype, "normalization": norm.as_dict() if norm else None},
        "run_id": run_id,
        "started": now_iso(),
        "status": "running",
    }

def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=list)

#: settings added to the output identity after outputs were first written
_RECORDED_SINCE = {"precision", "runtime"}


def output_changes(seg: dict[str, Any], image: SourceImage, model: ModelRef, settings: SegmentSettings,
                   norm: InputNorm | None = None) -> list[str]:
    """What differs between an existing output's provenance and this run, in words ([] = same output)."""
    changes: list[str] = []
    old_norm = (seg.get("input") or {}).get("normalization")
    if norm is not None and old_norm is not None and _canonical(old_norm) != _canonical(norm.as_dict()):
        changes.append(f"model input normalization {old_norm} → {norm.as_dict()}")
    if seg.get("source_fingerprint") != image.fingerprint:
        changes.append("the source image changed")
    old_model = seg.get("model") or {}
    if old_model.get("weights_sha256") != model.sha256:
        changes.append(f"model weights {str(old_model.get('weights_sha256'))[:12]} → {model.sha256[:12]}")
    for key, value in model.spec.core().items():
        if key in old_model and _canonical(old_model[key]) != _canonical(value):
            changes.append(f"model {key} {old_model[key]} → {value}")
    old_settings = seg.get("settings")
    new_settings = settings.output_settings()
    if not isinstance(old_settings, dict) and "chunk_size" in seg:
        # written before settings were recorded by name: what was recorded, tiles = chunks then
        old_settings = {**new_settings, "chunk_size": seg.get("chunk_size"), "halo": seg.get("halo"),
                        "multiple_of": seg.get("multiple_of", 32), "tile_size": seg.get("chunk_size"),
                        "bands": seg.get("bands"), "tta": seg.get("tta", False)}
    if isinstance(old_settings, dict):
        for key, value in new_settings.items():
            if key in _RECORDED_SINCE and key not in old_settings:
                continue  # an output from before the key was recorded: unknown, not a change
            if _canonical(old_settings.get(key)) != _canonical(value):
                changes.append(f"{key} {old_settings.get(key)} → {value}")
    elif seg.get("settings_key") != settings.output_key():
        changes.append("settings changed")
    return changes

@dataclass(frozen=True)
class OutputPlan:
    """What a run does with an output path: new | skip | resume | replace | refuse, and why."""

    action: str
    reason: str = ""

def plan_output(existing: Existing, image: SourceImage, model: ModelRef, settings: SegmentSettings,
                norm: InputNorm | None = None, auto_precision: bool = False) -> OutputPlan:
    """Decide from what is at the output path; never touches anything the user owns.

    Outputs follow their inputs: a changed source image or model is recomputed (with a note).
    A complete output whose only difference is the settings is kept unless ``overwrite``.
    Files, foreign folders and outputs of other images are refused.

    ``auto_precision``: this run's precision is what ``--precision auto`` resolved to on its workers
    (``settings`` holds the resolved one). A complete output computed in another precision is then
    *kept* (skip, with a note naming both): new hardware that resolves ``auto`` differently must not
    turn a finished backlog into failures or recomputations; ``overwrite`` recomputes it. An explicit
    ``--precision`` that differs is a settings change like any other.
    """
    if existing.kind == "none":
        return OutputPlan("new")
    if existing.kind in ("file", "foreign"):
        what = "a file" if existing.kind == "file" else "a folder"
        return OutputPlan("refuse", f"exists and is not a segpipe output ({what}); it was left untouched: "
                                    "move it away or choose another --out")
    seg = existing.provenance
    if seg.get("source") != image.uri:
        return OutputPlan("refuse", f"holds the output of another image ({seg.get('source')}); it was left "
                                    "untouched: choose another --out")
    complete = seg.get("status") == "complete"
    changes = output_changes(seg, image, model, settings, norm)
    kept_precision = [c for c in changes if c.startswith("precision ")] if auto_precision and complete else []
    if kept_precision and not settings.output.overwrite:
        changes = [c for c in changes if c not in kept_precision]
        if not changes:
            old = str((seg.get("settings") or {}).get("precision"))
            return OutputPlan("skip", f"kept: complete in {old}, while --precision auto resolves to "
                                      f"{settings.inference.precision} on these workers; pass --overwrite "
                                      "(flow parameter overwrite=True) to recompute it")
    if not changes:
        return OutputPlan("skip" if complete else "resume")
    what = "; ".join(changes)
    if not complete:
        return OutputPlan("replace", f"replacing an unfinished output ({what})")
    inputs_changed = any(c.startswith(("the source", "model ")) for c in changes)
    if inputs_changed or settings.output.overwrite:
        return OutputPlan("replace", f"replacing the complete output ({what})")
    return OutputPlan("refuse", f"is complete with other settings ({what}); it was kept: pass --overwrite "
                                "(flow parameter overwrite=True) to replace it")

def assign_outputs(images: Sequence[SourceImage], out: str) -> dict[str, str]:
    """Output URI per image URI, unique within the run.

    Rule: ``OUT/<relative path, extension → .zarr>``. When several images map to the same
    name (``hopper.jpg`` and ``hopper.png``; names are compared case-insensitively), they
    keep their extension (``hopper.jpg.zarr``, ``hopper.png.zarr``) — except the one that
    already owns the plain name from an earlier run, which keeps it, so names stay stable.
    """
    by_name: dict[str, list[SourceImage]] = {}
    for image in images:
        by_name.setdefault(output_uri(out, image.relative).casefold(), []).append(image)
    names: dict[str, str] = {}
    for group in by_name.values():
        if len(group) == 1:
            names[group[0].uri] = output_uri(out, group[0].relative)
            continue
        plain = output_uri(out, group[0].relative)
        existing = inspect_output(plain)
        owner = existing.provenance.get("source") if existing.kind == "segpipe" else None
        for image in group:
            if image.uri == owner:
                names[image.uri] = plain
            else:
                names[image.uri] = output_uri(out, image.relative, keep_extension=True)
    return names
