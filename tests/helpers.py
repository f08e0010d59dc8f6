"""Small seeded test data made in the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def sample_photo(height: int | None = None, width: int | None = None) -> np.ndarray:
    """scikit-image's bundled astronaut photo (a real photograph), (3, H, W) uint8, cropped or tiled."""
    from skimage import data

    img = data.astronaut().transpose(2, 0, 1)  # 512×512
    h, w = height or img.shape[1], width or img.shape[2]
    reps = (1, -(-h // img.shape[1]), -(-w // img.shape[2]))
    return np.ascontiguousarray(np.tile(img, reps)[:, :h, :w])


def write_geotiff(path: Path, array: np.ndarray, *, crs: str | None = "EPSG:32633", pixel: float = 0.5,
                  tiled: bool = True, compress: str | None = "deflate", nodata: float | None = None) -> Path:
    """Write (bands, H, W) as a GeoTIFF (georeferenced unless crs is None)."""
    import rasterio
    from rasterio.transform import from_origin

    profile = dict(driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                   dtype=array.dtype.name)
    if crs:
        profile.update(crs=crs, transform=from_origin(500000.0, 4100000.0, pixel, pixel))
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if compress:
        profile.update(compress=compress)
    if nodata is not None:
        profile.update(nodata=nodata)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(array)
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array.transpose(1, 2, 0)).save(path)
    return path


def write_jpeg(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array.transpose(1, 2, 0)).save(path, quality=95)
    return path


def competing_classes_model(out: Path, image: np.ndarray, classes=("a", "b", "c", "d"), seed: int = 0,
                            arch: str = "Unet", encoder: str = "resnet18") -> Path:
    """A random-init artifact whose head is re-centred so every class wins on a good share of pixels.

    A randomly initialised network predicts one class almost everywhere, which makes any
    stitching test pass vacuously. Standardising each class's logit over a real image
    (subtract its mean, divide by its std, folded into the head's weights and bias) makes
    the labels follow image content instead.
    """
    import torch

    from segpipe.models.artifact import create_artifact, load_artifact, save_artifact

    spec = create_artifact(str(out), arch, encoder, list(classes), in_channels=image.shape[0], seed=seed)
    art = load_artifact(str(out))
    net = art.network()
    x = torch.from_numpy(image[None].astype(np.float32))
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    x = (x / spec.input_scale - mean) / std
    h, w = x.shape[2] // 32 * 32, x.shape[3] // 32 * 32
    with torch.inference_mode():
        logits = net(x[:, :, :h, :w])
    m = logits.mean(dim=(0, 2, 3))
    s = logits.std(dim=(0, 2, 3)).clamp_min(1e-6)
    head = net.segmentation_head[0]
    with torch.no_grad():
        head.weight.div_(s.view(-1, 1, 1, 1))
        head.bias.sub_(m).div_(s)
    save_artifact(str(out), spec, net.state_dict())
    return out


def segment_to_zarr(source: str, model_dir: str, out_dir, client, chunk: int = 128, halo: int = 16) -> str:
    """Run the real pipeline on one image (fp32 on the CPU) and return its output's URI."""
    from segpipe.core.settings import segment_settings
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.storage import list_images

    settings = segment_settings(chunk_size=chunk, halo=halo, device="cpu", precision="fp32")
    ref, _ = check_model(model_dir)
    result = segment_image(list_images(source)[0], ref, str(out_dir), settings, client)
    assert result.status == "done", result.error
    return result.output
