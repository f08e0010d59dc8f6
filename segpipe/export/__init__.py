"""Exports of an output: COG (+ QGIS style, GDAL class table), vectors, previews."""
