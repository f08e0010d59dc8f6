"""A DICOM whole-slide series written by wsidicom from arrays (uncompressed RGB tiles, so pixels compare exactly)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np


def write_dicom_wsi(folder: Path, levels: list[np.ndarray], mpp: float, tile: int = 64) -> list[Path]:
    """Write pyramid ``levels`` ((H, W, 3) uint8, each half the previous) as one DICOM WSI series in ``folder``;
    level 0 has ``mpp`` µm per pixel. Returns the instance files."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from wsidicom import WsiDicom
    from wsidicom.codec import Encoder
    from wsidicom.geometry import Size, SizeMm
    from wsidicom.instance import ImageData, WsiInstance
    from wsidicom.instance.dataset import WsiDataset
    from wsidicom.metadata import Equipment, ImageType, Label, Patient, Pyramid, Series, Slide, Study, WsiMetadata
    from wsidicom.metadata import Image as ImageMetadata
    from wsidicom.metadata.optical_path import OpticalPath
    from wsidicom.metadata.sample import SlideSample
    from wsidicom.metadata.schema.dicom.wsi import WsiMetadataDicomSchema
    from wsidicom.source import Source

    class Tiles(ImageData):
        """One level's array as uncompressed tiles (the last row and column padded white)."""

        def __init__(self, array: np.ndarray, level_mpp: float) -> None:
            self._array, self._mpp = array, level_mpp
            super().__init__(Encoder.create(ExplicitVRLittleEndian, 8, "RGB"))

        transfer_syntax = property(lambda self: ExplicitVRLittleEndian)
        image_size = property(lambda self: Size(self._array.shape[1], self._array.shape[0]))
        tile_size = property(lambda self: Size(tile, tile))
        pixel_spacing = property(lambda self: SizeMm(self._mpp / 1000, self._mpp / 1000))
        imaged_size = property(lambda self: None)
        samples_per_pixel = property(lambda self: 3)
        photometric_interpretation = property(lambda self: "RGB")
        bits = property(lambda self: 8)
        image_coordinate_system = property(lambda self: None)
        thread_safe = property(lambda self: True)
        lossy_compression = property(lambda self: None)
        transcoder = property(lambda self: None)

        def get_decoded_tile(self, tile_point, z, path, cache=True) -> np.ndarray:
            out = np.full((tile, tile, 3), 255, np.uint8)
            block = self._array[tile_point.y * tile:(tile_point.y + 1) * tile,
                                tile_point.x * tile:(tile_point.x + 1) * tile]
            out[:block.shape[0], :block.shape[1]] = block
            return out

        def get_encoded_tile(self, tile_point, z, path) -> bytes:
            return self.get_decoded_tile(tile_point, z, path).tobytes()

    class Arrays(Source):
        def __init__(self) -> None:
            super().__init__()
            metadata = WsiMetadata(
                study=Study(uid=generate_uid()), series=Series(uid=generate_uid()), patient=Patient(),
                equipment=Equipment(), label=Label(),
                slide=Slide(identifier="slide-1", samples=[SlideSample(identifier="sample-1", uid=generate_uid())]),
                pyramid=Pyramid(image=ImageMetadata(), optical_paths=[OpticalPath(identifier="0")], uid=generate_uid()),
                frame_of_reference_uid=generate_uid(), dimension_organization_uids=[generate_uid()])
            self._base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME)
            self._levels = []
            for i, array in enumerate(levels):
                data = Tiles(array, mpp * 2 ** i)
                base = copy.deepcopy(self._base)
                base.SOPInstanceUID = generate_uid()  # one instance per level
                self._levels.append(WsiInstance(WsiDataset.create_instance_dataset(base, ImageType.VOLUME, data, 0),
                                                data))

        base_dataset = property(lambda self: self._base)
        level_instances = property(lambda self: self._levels)
        label_instances = property(lambda self: [])
        overview_instances = property(lambda self: [])
        thumbnail_instances = property(lambda self: [])
        annotation_instances = property(lambda self: [])

        def close(self) -> None:
            pass

    folder.mkdir(parents=True, exist_ok=True)
    with WsiDicom(Arrays()) as wsi:
        return [Path(str(p)) for p in wsi.save(folder)]
