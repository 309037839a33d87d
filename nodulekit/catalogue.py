"""What the model registry offers, for ``nodulekit models``: each architecture with its name in
the paper, the map methods it supports and its size."""

from __future__ import annotations

from typing import Any


def model_catalogue(in_channels: int = 11) -> list[dict[str, Any]]:
    """One record per registered name (aliases included): name, paper name, description, the
    map kind of its head, the map methods ``nodulekit maps`` accepts for it and its parameter
    count with default options for ``in_channels`` input slices."""
    import torch

    from nodulekit.maps import supported_methods
    from nodulekit.models import create_model, describe_models
    from nodulekit.models.registry import model_spec

    rows = []
    for name, description, map_kind in describe_models():
        with torch.device("meta"):  # shapes only: no memory, no initialisation of VGG16's 134 M weights
            model = create_model(name, in_channels).eval()
        rows.append(
            {
                "name": name,
                "paper_name": model_spec(name).paper_name or "",
                "description": description,
                "map_kind": map_kind,
                "map_methods": supported_methods(model),
                "parameters": int(sum(p.numel() for p in model.parameters())),
                "in_channels": in_channels,
            }
        )
    return rows


def catalogue_markdown(rows: list[dict[str, Any]]) -> str:
    channels = rows[0]["in_channels"] if rows else "?"
    lines = [
        f"| name | paper name | map methods | parameters ({channels} channels) | description |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['paper_name'] or '–'} | {', '.join(r['map_methods'])} | "
            f"{r['parameters']:,} | {r['description']} |"
        )
    return "\n".join(lines) + "\n"
