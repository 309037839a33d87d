"""The model input of the paper (Table 1) as one value: :class:`InputSpec`.

Everything that decides how ``x`` is made from a CT, as numbers: the 1 mm planes of the
intermediate window (offsets -10..+10 mm), the window rule (side max(4.5 x diameter, 16 mm)
in pixels of the smaller pixel spacing, odd), the channel layout (each channel's plane
offset and crop side factor p), the 32x32 patch, the HU window (-1000..400) and the fixed
arithmetic (linear z interpolation, HU rounded half to even, clip before the bilinear
in-plane resampling, edge replication outside the scan). Datasets, run.json and ONNX
files store :meth:`InputSpec.as_dict`; whether a model fits a dataset or an input is
:meth:`InputSpec.difference`, a comparison of these numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nodulekit.constants import INPUT_SIZE
from nodulekit.errors import NodulekitError

SCHEMA = "nodulekit-input-spec/1"
CHANNEL_CHOICES = (1, 3, 11, 21)
PLANES_MM = tuple(float(v) for v in range(-10, 11))  # the window's planes: 21, 1 mm apart
HU_WINDOW = (-1000.0, 400.0)
WINDOW_DIAMETERS = 4.5  # window side in nodule diameters (room for a 4x crop at any sub-pixel centre)
MIN_WINDOW_MM = 16.0
# The arithmetic every spec of this schema shares; a file asking for anything else is refused.
RULES = {
    "z_interpolation": "linear",  # between the two source slices around each plane, end slice repeated
    "hu_rounding": "half_to_even",  # HU rounded to whole numbers after the z interpolation
    "window_spacing": "min",  # the smaller of the two pixel spacings sizes the window
    "clip": "before_resampling",  # HU clipped to the window, scaled, then resampled in-plane
    "in_plane_interpolation": "bilinear",  # edge pixels repeated beyond the window
    "outside_scan": "edge",  # window pixels and planes beyond the scan repeat its edge
}


@dataclass(frozen=True)
class Channel:
    """One input channel: the plane at ``z_offset_mm`` from the centre, a crop of side ``p`` x diameter."""

    z_offset_mm: float
    p: float


@dataclass(frozen=True)
class InputSpec:
    """How the model input ``x`` [C, patch, patch] is made from a CT, a centre and a diameter."""

    channels: tuple[Channel, ...]
    planes_mm: tuple[float, ...] = PLANES_MM
    patch_px: int = INPUT_SIZE
    hu_window: tuple[float, float] = HU_WINDOW
    window_diameters: float = WINDOW_DIAMETERS
    min_window_mm: float = MIN_WINDOW_MM

    def __post_init__(self) -> None:
        if not self.channels:
            raise NodulekitError("an input spec needs at least one channel")
        for i, c in enumerate(self.channels):
            if c.z_offset_mm not in self.planes_mm:
                raise NodulekitError(
                    f"input spec channel {i}: plane {c.z_offset_mm:+g} mm is not one of the window's planes "
                    f"({self.planes_mm[0]:+g}..{self.planes_mm[-1]:+g} mm, 1 mm apart)"
                )
            if not 0 < c.p <= self.window_diameters - 0.5:
                raise NodulekitError(
                    f"input spec channel {i}: crop side {c.p:g} x diameter does not fit the window "
                    f"({self.window_diameters:g} x diameter; p must be in (0, {self.window_diameters - 0.5:g}])"
                )
        lo, hi = self.hu_window
        if not lo < hi:
            raise NodulekitError(f"input spec HU window {list(self.hu_window)} is empty")

    # ------------------------------------------------------------------ facts

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def centre_plane(self) -> int:
        """Index of the 0 mm plane in :attr:`planes_mm`."""
        return self.planes_mm.index(0.0)

    def plane_index(self, c: int) -> int:
        """Index into :attr:`planes_mm` of channel ``c``'s plane."""
        return self.planes_mm.index(self.channels[c].z_offset_mm)

    @property
    def reference_channel(self) -> int:
        """The channel the activation map is placed by: the plane nearest 0 mm with the smallest crop."""
        return min(range(self.n_channels), key=lambda c: (abs(self.channels[c].z_offset_mm), self.channels[c].p))

    @property
    def name(self) -> str:
        """The paper's dataset name (D1C, D3C, D11C, D21C) when the layout is one of them."""
        return f"D{self.n_channels}C"

    # ------------------------------------------------------------------ storage

    def as_dict(self) -> dict[str, Any]:
        """The JSON record stored in datasets, run.json and ONNX metadata (``input_spec``)."""
        return {
            "schema": SCHEMA,
            "channels": [{"z_offset_mm": c.z_offset_mm, "p": c.p} for c in self.channels],
            "planes_mm": list(self.planes_mm),
            "patch_px": self.patch_px,
            "hu_window": list(self.hu_window),
            "window_diameters": self.window_diameters,
            "min_window_mm": self.min_window_mm,
            **RULES,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_dict(cls, record: Any, where: str = "input spec") -> InputSpec:
        """The spec of a stored record; one-line refusal for another schema, rule or malformed numbers."""
        if isinstance(record, str):
            try:
                record = json.loads(record)
            except ValueError:
                raise NodulekitError(f"{where}: input_spec is not valid JSON") from None
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            found = record.get("schema") if isinstance(record, dict) else type(record).__name__
            raise NodulekitError(f"{where}: input spec schema {found!r} is not {SCHEMA!r}; update nodulekit")
        for key, value in RULES.items():
            if record.get(key) != value:
                raise NodulekitError(
                    f"{where}: its input spec asks for {key} = {record.get(key)!r}; this nodulekit builds inputs "
                    f"only with {key} = {value!r}"
                )
        try:
            return cls(
                channels=tuple(Channel(float(c["z_offset_mm"]), float(c["p"])) for c in record["channels"]),
                planes_mm=tuple(float(v) for v in record["planes_mm"]),
                patch_px=int(record["patch_px"]),
                hu_window=(float(record["hu_window"][0]), float(record["hu_window"][1])),
                window_diameters=float(record["window_diameters"]),
                min_window_mm=float(record["min_window_mm"]),
            )
        except (KeyError, TypeError, ValueError, IndexError):
            raise NodulekitError(f"{where}: its input spec is malformed") from None

    # ------------------------------------------------------------------ comparison

    def difference(self, other: InputSpec) -> str | None:
        """What differs between two specs, in numbers (None when equal): a model trained on one
        gives wrong answers on inputs made by the other."""
        if self == other:
            return None
        if self.n_channels != other.n_channels:
            return f"{self.n_channels} channels vs {other.n_channels}"
        if self.channels != other.channels:
            i = next(i for i, (a, b) in enumerate(zip(self.channels, other.channels, strict=True)) if a != b)
            a, b = self.channels[i], other.channels[i]
            return (
                f"channel {i} is the plane at {a.z_offset_mm:+g} mm with a {a.p:g} x diameter crop vs "
                f"{b.z_offset_mm:+g} mm with {b.p:g} x diameter"
            )
        for name, unit in (
            ("hu_window", " HU"),
            ("patch_px", " px"),
            ("planes_mm", " mm"),
            ("window_diameters", " x diameter"),
            ("min_window_mm", " mm"),
        ):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                return f"{name} {_num(a)}{unit} vs {_num(b)}{unit}"
        return "the input specs differ"  # pragma: no cover - every field is compared above


def _num(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return f"{value:g}"


def paper_spec(channels: int) -> InputSpec:
    """The paper's layout for ``channels`` in {1, 3, 11, 21} (Table 1): D1C the centre plane, p 2;
    D3C the centre plane three times, p 2, 3, 4; D11C / D21C the planes -5..+5 / -10..+10 mm, p 2."""
    if channels not in CHANNEL_CHOICES:
        raise NodulekitError(f"--channels must be one of {', '.join(map(str, CHANNEL_CHOICES))} (got {channels})")
    if channels == 3:
        return InputSpec(tuple(Channel(0.0, p) for p in (2.0, 3.0, 4.0)))
    half = channels // 2
    return InputSpec(tuple(Channel(float(z), 2.0) for z in range(-half, half + 1)))


def legacy_spec(channels: int, channel_layout: Any = None, normalisation: Any = None) -> InputSpec | None:
    """The spec of a file written before specs were stored, from its old fields: the recorded
    channel layout (else the paper's for ``channels``) and the normalisation's HU window (else
    the paper's). Every other number never changed. None when the layout cannot be known."""
    if channel_layout:
        try:
            layout = tuple(Channel(float(c["z_offset_mm"]), float(c["p"])) for c in channel_layout)
        except (KeyError, TypeError, ValueError):
            return None
    elif channels in CHANNEL_CHOICES:
        layout = paper_spec(channels).channels
    else:
        return None
    window = HU_WINDOW
    if isinstance(normalisation, dict) and normalisation.get("hu_window") is not None:
        lo, hi = normalisation["hu_window"]
        window = (float(lo), float(hi))
    try:
        return InputSpec(layout, hu_window=window)
    except NodulekitError:
        return None


def stored_spec(
    spec: Any, channels: int, channel_layout: Any = None, normalisation: Any = None, where: str = "input spec"
) -> InputSpec | None:
    """The spec a file records (``input_spec``: a dict or its JSON), else the one its older fields
    imply (:func:`legacy_spec`); None when neither says how its channels were made."""
    if spec is not None and spec != "unknown":
        return InputSpec.from_dict(spec, where)
    if isinstance(normalisation, str):
        try:
            normalisation = json.loads(normalisation)
        except ValueError:
            normalisation = None
    return legacy_spec(channels, channel_layout, normalisation)
