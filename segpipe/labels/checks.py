"""Labels that say nothing are refused: a file whose features all miss the image, an empty layer without
regions that say the image holds nothing, regions that all miss it — one line naming the file, its CRS and
bounds and the image's (:func:`check_says_something`, called when a file is prepared)."""

from __future__ import annotations

import numpy as np
import shapely

from segpipe.core.errors import DatasetError
from segpipe.io.readers import ImageInfo
from segpipe.labels.burn import LabelShapes
from segpipe.labels.vectors import VectorFeatures


def check_says_something(labels_file: VectorFeatures | None, labels: LabelShapes,
                         region_sources: list[VectorFeatures], regions: LabelShapes | None, image: ImageInfo, *,
                         image_name: str | None = None) -> None:
    """Refuse labels that would train an image as "all unlabelled" without anybody having said so.

    * a label file whose features (with an area) all miss the image — a wrong CRS, another image's file;
    * a label file without any feature (an empty layer: an annotator who did not save), unless labelled
      regions on the image say where it was looked at: regions and no labels is how to say "nothing there";
    * labelled regions that all miss the image (nothing would be labelled at all).

    The error names the file, its CRS and bounds, and the image's.
    """
    if labels_file is not None:
        s = labels.stats  # label features only: region-class features are prepared apart
        if not len(labels) and s.outside:
            raise DatasetError(labels_file.uri, f"all {s.outside} feature(s) lie outside the image "
                                                f"({_extent(labels_file, image)}); check the file's CRS and that it "
                                                "is this image's file")
        if not len(labels) and regions is None:
            what = f"holds {s.features} feature(s), none with an area" if s.features else "holds no features"
            name = image_name or "<name>"
            raise DatasetError(labels_file.uri, f"{what} ({_extent(labels_file, image)}); an unsaved layer? To say "
                               f"that the image holds nothing to label, draw where it was looked at as regions "
                               f"(regions/{name}.<ext>, a 'regions' layer or a region class)")
    if regions is not None and not len(regions):
        first = region_sources[0]
        what = "lie outside the image" if regions.stats.outside else "hold no feature with an area"
        raise DatasetError(first.uri, f"the labelled regions of this image all {what} "
                                      f"({_extent(first, image)}): nothing on it would be labelled")


def _crs_name(wkt: str) -> str:
    from pyproj import CRS

    crs = CRS.from_wkt(wkt)
    auth = crs.to_authority()
    return f"{auth[0]}:{auth[1]}" if auth else crs.name


def _bounds_text(b: tuple[float, float, float, float] | np.ndarray) -> str:
    return f"x {b[0]:.10g}..{b[2]:.10g}, y {b[1]:.10g}..{b[3]:.10g}"


def _extent(feats: VectorFeatures, image: ImageInfo) -> str:
    """The file's CRS and bounds and the image's, in their own coordinates (the facts a wrong CRS shows in)."""
    present = [g for g in feats.geoms if g is not None and not shapely.is_empty(g)]
    if feats.pixel_space or image.transform is None:
        file_crs = "pixels"
    elif feats.crs_wkt is None:
        file_crs = "no CRS (read as the image's)"
    else:
        file_crs = _crs_name(feats.crs_wkt)
    file_part = f"file {file_crs}" + (f", {_bounds_text(shapely.total_bounds(present))}" if present else ", empty")
    if feats.pixel_space or image.transform is None:
        scale = image.grid.scale  # level-0 pixels per pixel of the grid the labels are burned on
        level0 = "level-0 " if scale != 1.0 else ""
        img = f"image {image.uri}: {level0}pixels x 0..{image.width * scale:.10g}, y 0..{image.height * scale:.10g}"
    else:
        from affine import Affine

        t = Affine(*image.transform[:6])
        xs, ys = zip(*(t * (c, r) for c, r in ((0, 0), (image.width, 0), (0, image.height),
                                                (image.width, image.height))), strict=True)
        crs = _crs_name(image.crs_wkt) if image.crs_wkt else "no CRS"
        img = f"image {image.uri}: {crs}, {_bounds_text((min(xs), min(ys), max(xs), max(ys)))}"
    return f"{file_part}; {img}"
