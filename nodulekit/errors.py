"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class NodulekitError(Exception):
    """Bad input or an impossible request; the message is a complete one-line explanation."""

    exit_code = 2


class ArtifactError(NodulekitError):
    """An HDF5 artifact is missing, of the wrong kind or version, or malformed."""


class DataError(NodulekitError):
    """Source data (DICOM, NIfTI, manifest, annotations) is unusable."""


class WriteFailed(NodulekitError):
    """An output could not be stored (disk full, quota, read-only file system): the inputs were fine."""

    exit_code = 1

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message

    def __reduce__(self):  # keeps ``reason`` when raised in a worker process
        return type(self), (str(self), self.reason)
