"""`nodulekit models`: the architectures `train --arch` accepts."""

from __future__ import annotations

import json

import typer

from nodulekit.cli import app
from nodulekit.cli.common import AS_JSON


@app.command("models")
def models_cmd(
    channels: int = typer.Option(11, "--channels", "-c", min=1, help="Input slices the sizes are counted for."),
    as_json: bool = AS_JSON,
) -> None:
    """List the model registry: each name `train --arch` accepts, its name in the paper, the map methods `maps --method` can use with it, and its parameter count.

    Example: nodulekit models --channels 11
    """
    from nodulekit.catalogue import catalogue_markdown, model_catalogue

    rows = model_catalogue(channels)
    typer.echo(json.dumps(rows, indent=2) if as_json else catalogue_markdown(rows))
