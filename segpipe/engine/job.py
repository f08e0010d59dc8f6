"""What a tile task needs: the model reference (loaded on workers, never shipped) and the job of one image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from segpipe.core.grid import PixelGrid
from segpipe.core.retry import RetryPolicy
from segpipe.core.settings import InferenceSettings, ReadSettings, TilingSettings
from segpipe.io.output import (
    OutputTarget,
)
from segpipe.models.artifact import Artifact, ModelSpec, load_artifact
from segpipe.models.normalization import InputNorm
from segpipe.models.registry import resolve as resolve_model

if TYPE_CHECKING:

    pass

@dataclass(frozen=True)
class ModelRef:
    """What chunk tasks need to load the model on a worker: where it is and which weights."""

    uri: str
    sha256: str
    spec: ModelSpec

def check_model(model: str) -> tuple[ModelRef, Artifact]:
    """Resolve and load an artifact and build its network once, so a bad model fails before any image.

    The network built to validate it is kept by the artifact: a predictor made from the artifact in this
    process takes it instead of building a second one (~0.3 s of a run's start)."""
    from segpipe.engine.cluster import bound_openmp_spinning

    bound_openmp_spinning()  # before torch loads (a flow or library caller that did not preload it)
    artifact = load_artifact(resolve_model(model))
    artifact.keep_network(artifact.network())  # validates every tensor's name and shape
    return ModelRef(artifact.uri, artifact.sha256, artifact.spec), artifact

@dataclass(frozen=True)
class ChunkJob:
    """Everything a chunk task needs, all small and picklable."""

    source: str
    read: ReadSettings
    model: ModelRef
    inference: InferenceSettings
    tiling: TilingSettings
    target: OutputTarget
    background_class: int | None = None
    fingerprint: str = ""
    #: the image's input normalisation (fixed per pixel type, or a percentile stretch computed once)
    norm: InputNorm | None = None
    #: a slide whose background is removed: pixels outside the tissue mask get ``background_class``
    #: (or nodata) inside computed chunks too; each worker computes the mask once per image
    tissue: bool = False
    #: tiles per forward pass inside a task (tasks may carry more tiles than one forward: --task-seconds)
    forward_batch: int | None = None
    #: the pixel grid the image is segmented on (decided once by the driver; None = its own pixels)
    grid: PixelGrid | None = None
    #: the run's retries of storage faults that may pass (``SegmentSettings.retry``)
    retry: RetryPolicy = RetryPolicy()

TileWork = list[tuple[tuple[int, int], list[tuple[int, int]]]]
