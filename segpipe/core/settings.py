"""Typed, validated settings: one small frozen model per pipeline stage.

Each stage's function takes its own settings object, so every step can be called
on its own (no god-config). Unknown keys are rejected (``extra="forbid"``) so a
typo in a flow parameter or YAML file fails loudly instead of being ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from segpipe.core.errors import ConfigError
from segpipe.core.retry import RetryPolicy

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Runtime = Literal["auto", "torch", "onnx"]


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TilingSettings(_Settings):
    """How an image is cut into chunks (tile cores) and model input windows."""

    chunk_size: int = Field(
        512, ge=16, le=16384,
        description="Side of one output chunk in pixels; also the Zarr chunk shape (y, x).",
    )
    halo: int = Field(
        64, ge=0, le=4096,
        description="Context pixels added on each side of a chunk for the model and cropped after. "
        "Choose it from the model's effective receptive field: see docs/halo.md.",
    )
    multiple_of: int = Field(
        32, ge=1, le=1024,
        description="Model input sides are padded up to a multiple of this (Unet/FPN need 32).",
    )
    tile_size: int | None = Field(
        None, ge=16, le=16384,
        description="Side of the region the model sees at once (plus the halo), a multiple of chunk_size; it is "
        "cut into chunk_size × chunk_size Zarr chunks after inference. Bigger tiles compute less halo: a 512 "
        "chunk with a 64 halo computes (640/512)² = 1.56× its pixels, a 1,024 tile 1.27×, a 1,536 tile 1.18×, at "
        "more activation memory (Unet-resnet18, CPU: +0.35 GB at 1,024, +0.85 GB at 1,536). None = 2 × chunk_size "
        "(the same on every device, so outputs do not depend on where they ran); never larger than the image.",
    )

    @model_validator(mode="after")
    def _tile_multiple(self) -> TilingSettings:
        if self.tile_size is not None and self.tile_size % self.chunk_size:
            raise ValueError(f"tile_size {self.tile_size} must be a multiple of chunk_size {self.chunk_size}")
        return self

    @property
    def tile(self) -> int:
        """The requested tile side (``tile_size``, default 2 × ``chunk_size``)."""
        return self.tile_size if self.tile_size is not None else 2 * self.chunk_size


class ReadSettings(_Settings):
    """What to read from a source image."""

    bands: tuple[int, ...] | None = Field(
        None, description="1-based band indices to feed the model, in order; None = all bands.",
    )
    level: int | None = Field(
        None, ge=0, description="Pyramid level to segment (slides; GeoTIFF overviews: level N = overview N).",
    )
    mpp: float | None = Field(
        None, gt=0, description="Microns per pixel to segment at (slides): nearest finer level, then resampled. "
        "Default: the model's (model.json resolution).",
    )
    gsd: float | None = Field(
        None, gt=0, description="Ground sample distance (pixel size in CRS units) to segment georeferenced "
        "rasters at: area-averaged reads. Default: the model's (model.json resolution).",
    )
    skip_empty: bool = Field(
        True, description="Do not run the model on chunks that are all nodata (raster nodata value, mask or "
        "alpha: written as the nodata label) or, for slides, background outside the tissue mask (written as "
        "the background class, or the nodata label when none is chosen).",
    )
    max_pixels: float = Field(
        1e11, gt=0, description="Refuse images declaring more pixels than this (a 1 MB TIFF can declare "
        "200,000² pixels; 10¹¹ is a 316,000² image). Memory does not grow with size; time does.",
    )

    @field_validator("bands")
    @classmethod
    def _positive(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None:
            if not v:
                raise ValueError("bands must name at least one band")
            if any(b < 1 for b in v):
                raise ValueError(f"bands are 1-based, got {list(v)}")
        return v


class InferenceSettings(_Settings):
    """How tiles go through the model."""

    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto = CUDA when present).")
    precision: Precision = Field(
        "auto",
        description="auto = bf16 autocast where the device runs it natively (CUDA with bf16, CPUs with "
        "AMX/AVX-512-BF16), fp32 elsewhere.",
    )
    runtime: Runtime = Field(
        "auto",
        description="What runs the network's forward: torch, or onnx (ONNX Runtime, CPU, fp32; the network is "
        "exported once per weights and cached). auto = onnx on CPUs without native bf16 when onnxruntime is "
        "installed and the precision is fp32, torch elsewhere. Labels agree with torch fp32 (docs/benchmarks.md).",
    )
    batch_size: int | None = Field(
        None, ge=1, le=1024, description="Tiles per forward pass; None picks 1 on CPU (same speed, half the activation "
        "memory of 2), 16 on CUDA.",
    )
    task_seconds: float | None = Field(
        None, gt=0, le=3600,
        description="Target device time of one Dask tile task. None: today's size (1 tile on a CPU, ~6.5 MP on a "
        "GPU: ~40 tasks/s per H100, so one scheduler feeds tens of GPUs). Set (e.g. 2), tasks grow to about "
        "this many seconds of forwards, measured on the workers as they run, but never so large that the "
        "image has fewer than two tasks per worker thread; forward batches keep their size. Outputs do not "
        "change: every chunk is still written once, by the one task that holds its tile.",
    )
    tta: bool = Field(False, description="Average softmax over horizontal/vertical flips (4 passes).")
    probabilities: bool = Field(
        False, description="Also write a (class, y, x) uint8 'probabilities' array (p × 255).",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE_RE.match(v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v


class OutputSettings(_Settings):
    """Where and how masks are written."""

    zstd_level: int = Field(
        3, ge=1, le=22,
        description="zstd level of the mask chunks: 3 compresses a land-cover mask ~37× in 0.14 ms per 512² "
        "chunk; 9 gets ~53× but costs 19× the CPU time, which competes with the model on a CPU.",
    )
    background_class: int | None = Field(
        None, ge=0, description="Class written for slide background (outside the tissue mask) when skipped; "
        "None writes the nodata label there, like pixels without data.",
    )
    pyramid: bool = Field(True, description="Write lower-resolution levels 1, 2, … after level 0.")
    overwrite: bool = Field(
        False, description="Replace a complete output whose settings differ from this run's. Outputs whose "
        "source image or model changed are always recomputed (with a note); anything that is not a segpipe "
        "output of the same source is never touched.",
    )


class SegmentSettings(_Settings):
    """Everything that decides the pixels of an output (and so its skip/resume key)."""

    tiling: TilingSettings = Field(default_factory=TilingSettings)
    read: ReadSettings = Field(default_factory=ReadSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    #: how storage faults that may pass are retried (never part of an output's identity)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)

    def with_precision(self, precision: str) -> SegmentSettings:
        """These settings with ``auto`` replaced by the precision the workers resolved it to."""
        return self._with_inference(precision=precision)

    def with_runtime(self, runtime: str) -> SegmentSettings:
        """These settings with ``auto`` replaced by the runtime the workers resolved it to."""
        return self._with_inference(runtime=runtime)

    def _with_inference(self, **values: str) -> SegmentSettings:
        if all(getattr(self.inference, k) == v for k, v in values.items()):
            return self
        return self.model_copy(update={"inference": self.inference.model_copy(update=values)})

    def output_key(self) -> str:
        """Hash of the settings that change output pixels (device and batch size do not; precision and
        runtime do: bf16 and fp32 labels differ on a fraction of pixels, torch and ONNX Runtime on a few,
        so an output is computed in one precision by one runtime)."""
        blob = json.dumps(self.output_settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def output_settings(self) -> dict:
        """The settings that change output pixels, by name (recorded in provenance, diffed on reruns)."""
        return {
            **self.tiling.model_dump(exclude={"tile_size"}),
            "tile_size": self.tiling.tile,
            "bands": self.read.bands,
            "level": self.read.level,
            "mpp": self.read.mpp,
            "gsd": self.read.gsd,
            "skip_empty": self.read.skip_empty,
            "tta": self.inference.tta,
            "precision": self.inference.precision,
            "runtime": self.inference.runtime,
            "probabilities": self.inference.probabilities,
            "background_class": self.output.background_class,
        }


class ClusterSettings(_Settings):
    """Which Dask cluster runs the chunk tasks."""

    address: str | None = Field(
        None, description="tcp://host:port of an existing scheduler; None starts an embedded LocalCluster.",
    )
    n_workers: int | None = Field(None, ge=1, description="Embedded cluster: worker count (default: 1, or one per GPU).")
    threads_per_worker: int | None = Field(
        None, ge=1, description="Embedded cluster: threads per worker (default 3: read, compute, write overlap).",
    )
    processes: bool = Field(
        False,
        description="Embedded cluster: worker processes instead of threads in this process "
        "(threads start faster and torch/GDAL/zstd release the GIL).",
    )
    procs_per_device: int = Field(
        1, ge=1, le=16,
        description="Embedded cluster: worker processes per device. Above 1, each GPU gets this many worker "
        "processes, each seeing only its GPU (CUDA_VISIBLE_DEVICES), so one process's host work (reads, "
        "Python, writes) overlaps another's forward; the device still runs one forward at a time per process. "
        "Without a GPU the CPU is the one device and its cores are split between the processes.",
    )
    wait_for_workers: float = Field(
        600.0, ge=0, le=7 * 24 * 3600,
        description="Seconds a run waits for the first worker of a cluster that has none (adaptive clusters "
        "start at 0 workers and add them when work is queued); then it stops with one line. 0: do not wait.",
    )


def segment_settings(*, chunk_size: int = 512, halo: int = 64, tile_size: int | None = None,
                     batch_size: int | None = None, device: str = "auto", task_seconds: float | None = None,
                     precision: str = "auto", runtime: str = "auto", tta: bool = False, probabilities: bool = False,
                     bands: str | None = None, level: int | None = None, mpp: float | None = None,
                     gsd: float | None = None,
                     skip_empty: bool = True, max_pixels: float = 1e11, background_class: int | None = None,
                     overwrite: bool = False) -> SegmentSettings:
    """The one settings builder of ``segpipe segment`` and the ``segment-images`` flow (same names, same rules)."""
    return SegmentSettings(
        tiling=TilingSettings(chunk_size=chunk_size, halo=halo, tile_size=tile_size),
        read=ReadSettings(bands=parse_bands(bands), level=level, mpp=mpp, gsd=gsd, skip_empty=skip_empty,
                          max_pixels=max_pixels),
        inference=InferenceSettings(device=device, precision=precision, runtime=runtime, batch_size=batch_size, tta=tta,
                                    probabilities=probabilities, task_seconds=task_seconds),
        output=OutputSettings(background_class=background_class, overwrite=overwrite),
    )


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """Parse ``"1,2,3"`` into ``(1, 2, 3)``; ``None``/empty means all bands."""
    if text is None or not text.strip():
        return None
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError("bands", f"takes comma-separated 1-based integers, got {text!r}") from None
