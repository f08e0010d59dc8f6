"""How the output's class table is drawn: GIS style sidecars and the label → RGBA lookup table.

One class table everywhere (:mod:`segpipe.core.classes`): the COG's colour table, its GDAL
category names and raster attribute table (:func:`pam_xml`, ``<cog>.aux.xml``), its QGIS
style (:func:`qgis_style`, ``<cog stem>.qml``) and the preview legend all come from the
output's ``classes``/``class_colors`` (:func:`class_table`). The nodata label is transparent
in :func:`label_lut` and is never a category.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np

from segpipe.core.classes import lookup_table, parse_color
from segpipe.export.meta import OutputMeta


def class_table(meta: OutputMeta) -> list[tuple[int, str, tuple[int, int, int, int]]]:
    """(value, name, RGBA) per class — the one table every style file is written from."""
    n = len(meta.class_colors)
    names = [meta.classes[i] if i < len(meta.classes) else str(i) for i in range(n)]
    return [(i, names[i], tuple(int(v) for v in parse_color(meta.class_colors[i]))) for i in range(n)]


def pam_xml(meta: OutputMeta) -> str:
    """GDAL PAM sidecar (``.aux.xml``) of band 1: ``<CategoryNames>`` and a thematic raster attribute table.

    Categories are indexed by class id (0 … K−1); the attribute table has one row per class
    with columns Value (usage MinMax), Class (Name), Red, Green, Blue, Alpha. The nodata label is
    the band's NoData, not a category.
    """
    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    table = class_table(meta)
    cats = ET.SubElement(band, "CategoryNames")
    for _, name, _ in table:
        ET.SubElement(cats, "Category").text = name
    rat = ET.SubElement(band, "GDALRasterAttributeTable", tableType="thematic")
    # GDALRATFieldType: 0 integer, 2 string; GDALRATFieldUsage: 2 name, 5 min-max, 6–9 red/green/blue/alpha
    columns = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8), ("Alpha", 0, 9)]
    for i, (name, ftype, usage) in enumerate(columns):
        fd = ET.SubElement(rat, "FieldDefn", index=str(i))
        ET.SubElement(fd, "Name").text = name
        ET.SubElement(fd, "Type").text = str(ftype)
        ET.SubElement(fd, "Usage").text = str(usage)
    for row, (value, name, rgba) in enumerate(table):
        r = ET.SubElement(rat, "Row", index=str(row))
        for v in (value, name, *rgba):
            ET.SubElement(r, "F").text = str(v)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def qgis_style(meta: OutputMeta, band: int = 1) -> str:
    """QGIS layer style (``.qml``): a paletted renderer with one entry per class (value, colour, alpha, label).

    QGIS loads ``name.qml`` for ``name.tif`` by itself. The nodata label has no entry (QGIS
    draws values without an entry and the band's NoData transparent); nearest-neighbour
    resampling so zoomed views never blend class ids.
    """
    root = ET.Element("qgis", version="3.28.0", styleCategories="AllStyleCategories",
                      hasScaleBasedVisibilityFlag="0", minScale="1e+08", maxScale="0")
    pipe = ET.SubElement(root, "pipe")
    provider = ET.SubElement(pipe, "provider")
    ET.SubElement(provider, "resampling", enabled="false", maxOversampling="2",
                  zoomedInResamplingMethod="nearestNeighbour", zoomedOutResamplingMethod="nearestNeighbour")
    renderer = ET.SubElement(pipe, "rasterrenderer", type="paletted", band=str(band), opacity="1",
                             alphaBand="-1", nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for value, name, rgba in class_table(meta):
        ET.SubElement(palette, "paletteEntry", value=str(value), color="#{:02x}{:02x}{:02x}".format(*rgba[:3]),
                      alpha=str(rgba[3]), label=name)
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0", invertColors="0")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(pipe, "resamplingStage").text = "resamplingFilter"
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode") + "\n"


def label_lut(meta: OutputMeta) -> np.ndarray:
    """RGBA indexed by label value (:func:`segpipe.core.classes.lookup_table`): class colours, the nodata
    label transparent, grey for any other value. An output without a nodata label has none."""
    k = max(len(meta.class_colors), 1)
    lut = lookup_table(k, list(meta.class_colors))
    top = len(lut) - 1  # where lookup_table puts the nodata label
    if meta.nodata == top:
        return lut
    transparent = lut[top].copy()
    other = lut[k].copy() if k < top else np.array([128, 128, 128, 255], np.uint8)  # its "any other value"
    lut[top] = other
    if meta.nodata is not None:
        if meta.nodata >= len(lut):
            lut = np.concatenate([lut, np.tile(other, (meta.nodata + 1 - len(lut), 1))])
        lut[meta.nodata] = transparent
    return lut
