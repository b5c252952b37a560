"""The exception types that the CLI turns into one line on stderr: LayerIFError (exit 2) and DiskError (exit 1)."""


class LayerIFError(Exception):
    """User-facing error: bad input, missing file, unsupported model. Printed as one line."""


class DiskError(Exception):
    """An I/O error of the machine (not a full disk) while writing a named path; the previous outputs are intact."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code
