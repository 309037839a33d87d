"""The model's input, owned in one place: :class:`InputSpec` (the numbers of the paper's
Table 1 input) and :func:`model_input` (the one function that makes ``x`` from a CT volume,
a centre and a diameter). ``extract``, ``build``, ``predict``, ``infer`` and the model
description all take their facts from here.
"""

from nodulekit.inputs.sampling import (
    Z_OFFSETS_MM,
    ChannelSpec,
    ModelInput,
    centre_hu,
    model_input,
    normalise_hu,
    plane_layout,
    resample_levels,
    resample_nodule,
    sample_grid,
    sample_window,
    window_side_px,
)
from nodulekit.inputs.spec import (
    CHANNEL_CHOICES,
    HU_WINDOW,
    MIN_WINDOW_MM,
    PLANES_MM,
    RULES,
    SCHEMA,
    WINDOW_DIAMETERS,
    Channel,
    InputSpec,
    legacy_spec,
    paper_spec,
    stored_spec,
)

__all__ = [
    "CHANNEL_CHOICES",
    "HU_WINDOW",
    "MIN_WINDOW_MM",
    "PLANES_MM",
    "RULES",
    "SCHEMA",
    "WINDOW_DIAMETERS",
    "Z_OFFSETS_MM",
    "Channel",
    "ChannelSpec",
    "InputSpec",
    "ModelInput",
    "centre_hu",
    "legacy_spec",
    "model_input",
    "normalise_hu",
    "paper_spec",
    "plane_layout",
    "resample_levels",
    "resample_nodule",
    "sample_grid",
    "sample_window",
    "stored_spec",
    "window_side_px",
]
