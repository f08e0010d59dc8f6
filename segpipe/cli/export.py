"""``segpipe export``: an existing OUTPUT.zarr → COG, vectors, a preview or a confidence COG.

The writers live in :mod:`segpipe.export`; ``segment --cog/--vector/--preview`` uses the same ones.
"""

from __future__ import annotations

import click

from segpipe.cli.common import handle_errors


@click.command()
@click.argument("output")
@click.option("--cog", default=None, help="Write a Cloud-Optimized GeoTIFF of the class ids here.")
@click.option("--vector", default=None, help="Write polygons here (.gpkg, .geojson/.json, .shp, .fgb, .parquet).")
@click.option("--preview", default=None, help="Write a PNG preview here.")
@click.option("--confidence", default=None, help="Write a max-probability COG here (needs --probabilities).")
@click.option("--min-area", type=float, default=0.0, show_default=True, help="Drop polygons smaller than this.")
@click.option("--sieve", type=int, default=0, show_default=True, help="Remove regions under N pixels first.")
@handle_errors
def export(output: str, cog: str | None, vector: str | None, preview: str | None, confidence: str | None,
           min_area: float, sieve: int) -> None:
    """Export a segpipe OUTPUT.zarr to COG, vectors, a preview or a confidence COG."""
    from segpipe.export import export_cog, export_confidence, export_preview, export_vectors

    if not any((cog, vector, preview, confidence)):
        raise click.UsageError("name at least one of --cog, --vector, --preview, --confidence")
    if cog:
        click.echo(f"cog: {export_cog(output, cog)}")
    if vector:
        click.echo(f"vector: {export_vectors(output, vector, min_area=min_area, sieve=sieve)}")
    if preview:
        click.echo(f"preview: {export_preview(output, preview)}")
    if confidence:
        click.echo(f"confidence: {export_confidence(output, confidence)}")

