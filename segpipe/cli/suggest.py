"""``segpipe suggest``: where to label next, from the per-chunk uncertainty of finished outputs.

The ranking and the file formats live in :mod:`segpipe.evaluate.suggest`; the nightly flow publishes
the same regions as an artifact.
"""

from __future__ import annotations

import click

from segpipe.cli.common import handle_errors


@click.command()
@click.argument("outputs", nargs=-1, required=True)
@click.option("--top", type=int, default=20, show_default=True, help="How many regions to suggest.")
@click.option("--out", "out", required=True,
              help="Write the regions here; the extension picks the format (.gpkg, .geojson/.json, .shp, .fgb, "
                   ".parquet). Slides: QuPath annotations in level-0 pixels (use .geojson).")
@handle_errors
def suggest(outputs: tuple[str, ...], top: int, out: str) -> None:
    """Suggest the TOP regions of OUTPUTS (Zarr outputs, or folders of them) where labels would help most.

    Regions are output chunks ranked by the model's uncertainty (mean normalised entropy), spread
    across images and classes, never two neighbours. Each is printed in the file's units: map
    coordinates and CRS for georeferenced outputs, level-0 pixels and µm for slides, pixels for photos;
    fewer than TOP regions come with a note saying why.
    """
    from segpipe.evaluate.suggest import region_geometries, region_lines, suggest_regions, write_suggestions
    from segpipe.export.vectors import vector_driver

    vector_driver(out)  # an unknown extension fails before any output is read
    notes: list[str] = []
    regions = suggest_regions(list(outputs), top, notes)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    write_suggestions(regions, out)
    for line in region_lines(regions, region_geometries(regions, out)):  # in the file's units
        click.echo(line)
    click.echo(f"suggestions: {len(regions)} region(s) → {out}")
