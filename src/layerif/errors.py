"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class LayerIFError(Exception):
    """User-facing error: bad input, missing file, unsupported model. Printed as one line."""
