"""``segpipe models list|show|promote|prune``: the versions of a model registry and its champion."""

from __future__ import annotations

import click

from segpipe.cli.common import console, handle_errors


@click.group()
def models() -> None:
    """List, inspect, promote and prune registered model versions."""


@models.command("list")
@click.argument("registry")
@handle_errors
def models_list(registry: str) -> None:
    """List the versions of REGISTRY (the champion is starred)."""
    from rich.table import Table

    from segpipe.models.registry import list_versions

    table = Table(title=registry)
    for col in ("", "version", "created", "model", "val mean IoU", "weights"):
        table.add_column(col)
    for v in list_versions(registry):
        miou = f"{v.val_mean_iou:.4f}" if v.val_mean_iou is not None else "-"
        table.add_row("*" if v.is_champion else "", v.version, v.created or "-", f"{v.architecture}/{v.encoder}",
                      miou, v.weights_sha256[:12])
    console().print(table)


@models.command("show")
@click.argument("model")
@click.option("--stac", is_flag=True, help="Print the version as a STAC Item with the MLM extension instead.")
@handle_errors
def models_show(model: str, stac: bool) -> None:
    """Show a version (REGISTRY@vN), a registry's champion (REGISTRY) or an artifact folder."""
    import json

    if stac:
        from segpipe.models.registry import version_mlm_item

        click.echo(json.dumps(version_mlm_item(model), indent=2))
        return
    from segpipe.models.artifact import load_artifact
    from segpipe.models.registry import resolve

    art = load_artifact(resolve(model))
    info = {"uri": art.uri, "weights_sha256": art.sha256, **art.spec.dump()}
    training = info.get("training")
    if isinstance(training, dict):
        info["training"] = {k: v for k, v in training.items() if k != "history"}
    click.echo(json.dumps(info, indent=2, default=str))


@models.command("promote")
@click.argument("registry")
@click.argument("version")
@click.option("--reason", default="promoted by hand", show_default=True)
@handle_errors
def models_promote(registry: str, version: str, reason: str) -> None:
    """Make VERSION the champion of REGISTRY (atomic pointer replace)."""
    from segpipe.models.registry import promote

    promote(registry, version, reason)
    click.echo(f"{registry}: champion is now {version}")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@models.command("prune")
@click.argument("registry")
@click.option("--keep", type=int, required=True, help="How many of the newest versions to keep (at least 1).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@handle_errors
def models_prune(registry: str, keep: int, dry_run: bool) -> None:
    """Remove all but the KEEP newest versions of REGISTRY (never the champion nor the previous champion)."""
    from segpipe.models.registry import prune

    result = prune(registry, keep, dry_run=dry_run)
    verb, freed = ("would remove", "would free") if dry_run else ("removed", "freed")
    gone = ", ".join(f"{v} ({_mb(b)})" for v, b in result.removed) or "nothing"
    click.echo(f"{registry}: {verb} {gone}; {freed} {_mb(result.freed)}")
    click.echo("kept: " + ", ".join(f"{v} ({why})" for v, why in result.kept.items()))
