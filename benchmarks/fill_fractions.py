#!/usr/bin/env python
"""How much of each dataset's input is edge-replicated rather than real anatomy.

VOIs cut tight around a nodule do not reach 10 mm above and below it, nor 4 nodule diameters
in-plane, so extract fills what lies outside by edge replication and build flags every channel
that was filled (``filled_channels``: its slice lay outside the source in z;
``inplane_filled_channels``: its square ROI reaches into the in-plane filled border). This
script counts those flags over the labelled nodules of built datasets:

- D11C / D21C: the share of all channels, and of the non-centre channels (the "extra slices"
  of the multi-slice datasets), that are copies of the outermost real slice;
- D3C: the share of nodules whose 2x, 3x and 4x-diameter ROI reaches into the filled border.

    nodulekit extract --vois ../shared/data/lidc-vois -o rois_vois.h5
    nodulekit build rois_vois.h5 -o d3c.h5 --channels 3 --folds 5 --seed 0     # and 11, 21
    python benchmarks/fill_fractions.py d3c.h5 d11c.h5 d21c.h5 --json benchmarks/out/fill_fractions.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def fill_fractions(path: str | Path) -> dict:
    """The fill shares of one built dataset (labelled nodules only, the ones every run uses)."""
    from nodulekit.datasets import channel_layout, load_dataset

    ds = load_dataset(path)
    channels = ds.x.shape[1]
    layout = channel_layout(channels)
    labelled = np.asarray(ds.y) >= 0
    out = {"dataset": str(path), "channels": channels, "nodules": int(labelled.sum())}
    if ds.filled_channels is None:
        raise SystemExit(f"{path}: no filled_channels member (a dataset built before the fill flags)")
    z = np.asarray(ds.filled_channels, bool)[labelled]
    centre = np.array([s.z_offset_mm == 0 for s in layout])
    out["z_filled_share_all_channels"] = float(z.mean())
    if (~centre).any() and channels > 3:
        out["z_filled_share_non_centre_channels"] = float(z[:, ~centre].mean())
        out["nodules_with_any_z_filled"] = int(z.any(axis=1).sum())
    if ds.inplane_filled_channels is not None:
        inplane = np.asarray(ds.inplane_filled_channels, bool)[labelled]
        out["inplane_filled_share_of_nodules_by_channel"] = {
            f"{s.p:g}x diameter, z {s.z_offset_mm:+d} mm": float(inplane[:, k].mean()) for k, s in enumerate(layout)
        } if channels == 3 else {}  # fmt: skip
        out["inplane_filled_share_all_channels"] = float(inplane.mean())
    return out


def markdown(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        head = f"- `{r['dataset']}` ({r['channels']} channels, {r['nodules']} labelled nodules): "
        parts = [f"{100 * r['z_filled_share_all_channels']:.1f} % of all channels z-filled"]
        if "z_filled_share_non_centre_channels" in r:
            parts.append(f"{100 * r['z_filled_share_non_centre_channels']:.1f} % of the non-centre channels")
        for name, share in r.get("inplane_filled_share_of_nodules_by_channel", {}).items():
            parts.append(f"{name}: {100 * share:.1f} % of nodules reach the in-plane fill")
        lines.append(head + "; ".join(parts))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", type=Path, help="built dataset files (D3C, D11C, D21C, ...)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    rows = [fill_fractions(p) for p in args.datasets]
    print(markdown(rows), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
