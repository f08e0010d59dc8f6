from __future__ import annotations

import os

import numpy as np
import pytest

from tests.helpers import competing_classes_model, sample_photo, write_geotiff

# keep torch to the 2 cores the CI machine has, and quiet
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photograph of a size that is not a multiple of the chunk sizes used in tests."""
    return sample_photo(433, 389)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, photo) -> str:
    return str(competing_classes_model(tmp_path_factory.mktemp("model") / "unet", photo))


@pytest.fixture(scope="session")
def scene_tif(tmp_path_factory, photo) -> str:
    return str(write_geotiff(tmp_path_factory.mktemp("scene") / "scene.tif", photo))


@pytest.fixture(scope="session")
def client():
    """One embedded Dask cluster for the session (as the CLI would start)."""
    from segpipe.cluster import dask_client

    with dask_client() as c:
        yield c
