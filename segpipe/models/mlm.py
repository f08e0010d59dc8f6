"""A model artifact as a STAC Item with the Machine Learning Model extension (MLM v1.4.0).

What the item says, all from the artifact (``model.json`` and the safetensors header; no weights are
loaded): name and architecture (smp architecture and encoder), task ``semantic-segmentation``, the
input (bands, ``(batch, channel, height, width)`` float32, the normalisation as one z-score per band in
raw pixel units: ``(pixel − mean·s) / (std·s)`` is ``(pixel / s − mean) / std`` with ``s`` =
``input_scale``), the output (class logits, and the classes with their ids, names and colours as
``classification:classes``), framework and version, parameter count and size, and the weights asset
with its sha256 (``file:checksum`` as a multihash). An output's STAC item links to it
(``derived_from``, :mod:`segpipe.export.stac`); every registry version stores one
(:data:`MLM_ITEM`, written by :func:`segpipe.models.registry.register`).
"""

from __future__ import annotations

import datetime as _dt
import json
import struct
from importlib import metadata
from typing import Any

from segpipe.core.classes import class_colors, colors_from_spec
from segpipe.core.errors import ModelError
from segpipe.io.storage import filesystem, join, strip_file_scheme
from segpipe.models.artifact import MODEL_JSON, WEIGHTS, ModelSpec

STAC_VERSION = "1.1.0"
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
FILE_SCHEMA = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
#: the MLM item of a registry version, next to its model.json
MLM_ITEM = "mlm.json"
#: how the weights were written: ``safetensors.torch.save`` of the network's ``state_dict()``
ARTIFACT_TYPE = "safetensors.torch.save"
WEIGHTS_MEDIA_TYPE = "application/octet-stream; application=safetensors"


def weights_header(uri: str) -> tuple[int, int]:
    """(parameter count, file size in bytes) from a safetensors file's header alone (8 bytes + JSON)."""
    fs, path = filesystem(strip_file_scheme(uri))
    try:
        size = int(fs.size(path))
        with fs.open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size, 100 << 20):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelError(uri, "does not exist") from None
    except (OSError, ValueError, struct.error) as e:
        raise ModelError(uri, f"is not a valid safetensors file ({e})") from None
    params = 0
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        count = 1
        for d in entry.get("shape") or []:
            count *= int(d)
        params += count
    return params, size


def _framework_version() -> str:
    try:
        return metadata.version("torch").split("+")[0]
    except metadata.PackageNotFoundError:
        return "unknown"


def _value_scaling(spec: ModelSpec) -> list[dict[str, Any]] | None:
    """One z-score per band in raw pixel units, when the normalisation is a plain scale then mean/std."""
    if spec.normalization is not None or not isinstance(spec.input_scale, (int, float)):
        return None
    s = float(spec.input_scale)
    return [{"type": "z-score", "mean": m * s, "stddev": sd * s} for m, sd in zip(spec.mean, spec.std)]


def mlm_item(uri: str, spec: ModelSpec, sha256: str, *, item_id: str | None = None,
             created: str | None = None) -> dict[str, Any]:
    """The MLM STAC Item (a JSON-ready dict) of the artifact at ``uri`` with weights ``sha256``.

    ``item_id`` defaults to ``<architecture>-<encoder>-<sha256[:12]>``; ``created`` (ISO 8601) to now.
    Asset hrefs are the artifact's own files (absolute), so the item can be copied anywhere.
    """
    uri = strip_file_scheme(uri).rstrip("/")
    weights = join(uri, WEIGHTS)
    params, size = weights_header(weights)
    item_id = item_id or f"{spec.architecture}-{spec.encoder}-{sha256[:12]}".lower()
    when = created or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    bands = [f"b{i + 1}" for i in range(spec.in_channels)]
    # STAC 1.1 bands: in the properties (what mlm:input's names refer to) and on the weights asset (the
    # core schema allows bands in the properties only when an asset has them too)
    band_objects = [{"name": b, "description": f"band {i + 1} of the input, in the order the model reads them"}
                    for i, b in enumerate(bands)]
    colors = class_colors(spec.num_classes, colors_from_spec(spec.model_extra))
    extra = spec.model_extra or {}
    training = extra.get("training") if isinstance(extra.get("training"), dict) else {}
    pretrained = (training or {}).get("encoder_weights")
    core = spec.core()
    model_input: dict[str, Any] = {
        "name": "image",
        "bands": bands,
        "input": {"shape": [-1, spec.in_channels, -1, -1], "dim_order": ["batch", "channel", "height", "width"],
                  "data_type": "float32"},
        "description": f"{spec.in_channels} band(s) of pixel type {', '.join(spec.input_dtypes() or ['any'])}, "
                       "any size (tiled by segpipe: chunk + halo); normalised as value_scaling says"
                       + (f"; pixel size {core['resolution']}" if "resolution" in core else ""),
        "value_scaling": _value_scaling(spec),
        "resize_type": None,
    }
    if spec.normalization is not None:
        model_input["pre_processing_function"] = {"format": "segpipe-normalization",
                                                  "expression": spec.normalization.model_dump()}
    properties: dict[str, Any] = {
        "datetime": when,
        "created": when,
        "description": f"segpipe semantic segmentation model: {spec.architecture} with a {spec.encoder} encoder, "
                       f"{spec.num_classes} classes ({', '.join(spec.classes)})",
        "mlm:name": item_id,
        "mlm:architecture": spec.architecture,
        "mlm:tasks": ["semantic-segmentation"],
        "mlm:framework": "PyTorch",
        "mlm:framework_version": _framework_version(),
        "mlm:memory_size": size,
        "mlm:total_parameters": params,
        "mlm:pretrained": bool(pretrained),
        "mlm:pretrained_source": "ImageNet" if pretrained == "imagenet" else (pretrained or None),
        "mlm:accelerator": None,
        "mlm:accelerator_constrained": False,
        "mlm:accelerator_summary": "any PyTorch device: CUDA GPUs (bf16/fp16 autocast) or the CPU",
        "mlm:input": [model_input],
        "mlm:output": [{
            "name": "classes",
            "tasks": ["semantic-segmentation"],
            "result": {"shape": [-1, spec.num_classes, -1, -1], "dim_order": ["batch", "class", "height", "width"],
                       "data_type": "float32"},
            "description": "class logits; segpipe writes their argmax (class ids, uint8) per pixel",
            "classification:classes": [
                {"value": i, "name": name, "description": name, "color_hint": colors[i].lstrip("#")[:6]}
                for i, name in enumerate(spec.classes)],
            "post_processing_function": None,
        }],
        "mlm:hyperparameters": {"encoder": spec.encoder, "in_channels": spec.in_channels,
                                "classes": spec.num_classes},
        "bands": band_objects,
        "segpipe:model": {k: v for k, v in core.items() if k != "format"},
    }
    if "resolution" in core and core["resolution"].get("gsd"):
        properties["gsd"] = core["resolution"]["gsd"]
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [MLM_SCHEMA, FILE_SCHEMA],
        "id": item_id,
        "geometry": None,
        "properties": properties,
        "links": [],
        "assets": {
            "weights": {
                "href": weights,
                "type": WEIGHTS_MEDIA_TYPE,
                "title": f"{spec.architecture}/{spec.encoder} weights (state_dict, safetensors)",
                "roles": ["mlm:model", "mlm:weights", "data"],
                "mlm:artifact_type": ARTIFACT_TYPE,
                "file:checksum": "1220" + sha256,  # multihash: sha2-256 (0x12), 32 bytes (0x20)
                "file:size": size,
                "bands": band_objects,
            },
            "model-json": {
                "href": join(uri, MODEL_JSON),
                "type": "application/json",
                "title": "segpipe model.json (architecture, classes, normalisation)",
                "roles": ["metadata"],
            },
        },
    }


def artifact_mlm_item(uri: str, *, item_id: str | None = None, created: str | None = None) -> dict[str, Any]:
    """:func:`mlm_item` of an artifact folder, reading its ``model.json`` and hashing its weights."""
    import hashlib

    from segpipe.models.artifact import read_spec

    spec = read_spec(uri)
    fs, path = filesystem(strip_file_scheme(uri))
    h = hashlib.sha256()
    try:
        with fs.open(join(path, WEIGHTS), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise ModelError(uri, f"missing {WEIGHTS}") from None
    return mlm_item(uri, spec, h.hexdigest(), item_id=item_id, created=created)
