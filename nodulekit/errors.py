"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class NodulekitError(Exception):
    """Bad input or an impossible request; the message is a complete one-line explanation."""

    exit_code = 2


class ArtifactError(NodulekitError):
    """An HDF5 artifact is missing, of the wrong kind or version, or malformed."""


class DataError(NodulekitError):
    """Source data (DICOM, NIfTI, manifest, annotations) is unusable."""
