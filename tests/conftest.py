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
    from segpipe.engine.cluster import dask_client

    with dask_client() as c:
        yield c


@pytest.fixture(scope="session")
def harness():
    """Prefect's test harness (a temporary API), once per session: it takes ~10 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def landcover(tmp_path_factory) -> str:
    """A small synthetic land-cover dataset (train/val split, 5 classes)."""
    from segpipe.train.synthetic import write_dataset

    return str(write_dataset(tmp_path_factory.mktemp("landcover") / "data", 6, 192, seed=1))


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, landcover) -> str:
    """A briefly trained Unet-resnet18 (about a minute on 2 cores): seams need a real model."""
    from segpipe.train.loop import train
    from segpipe.train.settings import TrainSettings

    out = tmp_path_factory.mktemp("trained") / "model"
    settings = TrainSettings(architecture="Unet", encoder="resnet18", epochs=4, batch_size=8, patch_size=128,
                             patches_per_epoch=160, lr=2e-3, seed=0, early_stopping_patience=None)
    return train(landcover, str(out), settings, progress=False).uri


def pytest_configure(config):
    # compiled labels go to a cache of this test session, never the user's ~/.cache (subprocesses inherit it)
    import tempfile

    os.environ.setdefault("SEGPIPE_CACHE", tempfile.mkdtemp(prefix="segpipe-test-cache-"))
