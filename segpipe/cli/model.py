"""``segpipe model create|info``: write a randomly initialised artifact, inspect one."""

from __future__ import annotations

from typing import Any

import click

from segpipe.cli.common import handle_errors


@click.group()
def model() -> None:
    """Create and inspect model artifacts."""


@model.command("create")
@click.option("--arch", default="Unet", show_default=True, help="smp architecture (Unet, FPN, DeepLabV3Plus, …).")
@click.option("--encoder", default="resnet18", show_default=True, help="smp encoder (resnet18, resnet34, …).")
@click.option("--classes", required=True, help="Comma-separated class names, index = class id.")
@click.option("--class-colors", default=None,
              help="Comma-separated colours, one per class in --classes order (#rrggbb or #rgb); written as "
                   "model.json class_colors, the colours of every output, export and report. Default: segpipe's palette.")
@click.option("--in-channels", type=int, default=3, show_default=True)
@click.option("--out", required=True, help="Artifact folder to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def model_create(arch: str, encoder: str, classes: str, class_colors: str | None, in_channels: int, out: str,
                 seed: int) -> None:
    """Write a randomly initialised artifact (for smoke runs and benchmarks)."""
    from segpipe.core.classes import parse_color, to_hex
    from segpipe.core.errors import ConfigError
    from segpipe.models.artifact import create_artifact

    names = [c.strip() for c in classes.split(",") if c.strip()]
    extra: dict[str, Any] = {}
    if class_colors is not None:
        colors = [c.strip() for c in class_colors.split(",")]
        if len(colors) != len(names):
            raise ConfigError("--class-colors", f"gives {len(colors)} colour(s) for {len(names)} class(es); "
                                                "give one per class, in --classes order")
        extra["class_colors"] = [to_hex(parse_color(c)) for c in colors]
    spec = create_artifact(out, arch, encoder, names, in_channels=in_channels, seed=seed, **extra)
    click.echo(f"wrote {out}: {spec.architecture}/{spec.encoder}, {spec.in_channels} band(s), "
               f"{spec.num_classes} classes")


@model.command("info")
@click.argument("path")
@click.option("--stac", is_flag=True, help="Print the model as a STAC Item with the MLM extension instead.")
@handle_errors
def model_info(path: str, stac: bool) -> None:
    """Print an artifact's spec, weights hash and parameter count."""
    import json

    if stac:
        from segpipe.models.registry import version_mlm_item

        click.echo(json.dumps(version_mlm_item(path), indent=2))
        return
    from segpipe.models.artifact import load_artifact
    from segpipe.models.registry import resolve

    art = load_artifact(resolve(path))
    n_params = sum(int(t.numel()) for t in art.weights.values())
    info = {"uri": art.uri, **art.spec.dump(), "weights_sha256": art.sha256, "parameters": n_params}
    for key in ("training",):
        if key in info and isinstance(info[key], dict):
            info[key] = {k: v for k, v in info[key].items() if k != "history"}
    click.echo(json.dumps(info, indent=2))
