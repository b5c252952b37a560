"""Memory sizes as users write them (4GiB, 512MB, 2g) read into bytes."""

from __future__ import annotations

from layerif.errors import LayerIFError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str | int | float | None) -> int | None:
    """'4GiB', '512MB', '2g' or a number of bytes -> bytes (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise LayerIFError(f"cannot read memory size {text!r}; write e.g. 4GiB, 512MB or a number of bytes")
    return int(value * _UNITS[unit])
