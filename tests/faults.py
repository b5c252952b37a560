"""Fault injection at the project's own I/O layer (make the n-th write, fsync or rename of a command fail), and
hostile files for the untrusted-input tests and bench/hostile.py.

Every file layerif writes goes through `layerif.io` (`_write_step`, `_fsync`, `_rename`) or, for spilled
gradients, `layerif.gradients.spill.write_block`; `Faults` wraps those four, counts the calls in order and
raises OSError(code) at call number `fail_at` (None: count only).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import layerif.gradients.spill as spill
import layerif.io as io


@dataclass
class Faults:
    """Counts (and optionally fails) the I/O calls of whatever runs while installed."""

    fail_at: int | None = None
    code: int = errno.ENOSPC
    calls: list[tuple[str, str]] = field(default_factory=list)  # (operation, path) in call order
    failed: tuple[str, str] | None = None

    def _hit(self, operation: str, path: str | os.PathLike) -> None:
        self.calls.append((operation, str(path)))
        if len(self.calls) == self.fail_at:
            self.failed = (operation, str(path))
            raise OSError(self.code, os.strerror(self.code), str(path))

    def install(self, monkeypatch) -> Faults:
        """Patch the four primitives for the rest of the test (monkeypatch undoes it)."""
        write_step, fsync, rename, write_block = io._write_step, io._fsync, io._rename, spill.write_block

        def counted_write(write, tmp):
            self._hit("write", tmp)
            return write_step(write, tmp)

        def counted_fsync(fd):
            self._hit("fsync", os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").is_dir() else fd)
            return fsync(fd)

        def counted_rename(src, dst, exchange=False):
            self._hit("exchange" if exchange else "rename", dst)
            return rename(src, dst, exchange)

        def counted_block(handle, data):
            self._hit("spill-write", handle.name)
            return write_block(handle, data)

        monkeypatch.setattr(io, "_write_step", counted_write)
        monkeypatch.setattr(io, "_fsync", counted_fsync)
        monkeypatch.setattr(io, "_rename", counted_rename)
        monkeypatch.setattr(spill, "write_block", counted_block)
        return self


def expected_exit(code: int) -> int:
    """A full disk is the user's to fix (2); any other I/O error is the machine's (1)."""
    return 2 if code in (errno.ENOSPC, errno.EDQUOT) else 1


def sample(total: int, every: bool) -> list[int]:
    """Which call numbers to fail: all of 1..total, or the first, the middle and the last."""
    return list(range(1, total + 1)) if every else sorted({1, (total + 1) // 2, total})


# ---- hostile files: a pickle that would leave a mark if loaded, and damaged or escaping model files ----
class Planted:
    """Unpickling this touches `marker`: the proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(path: Path, marker: Path) -> None:
    """Write a pickle at `path` whose loading would create `marker`."""
    path.write_bytes(pickle.dumps({"weight": Planted(marker)}))


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


_GGUF3 = b"GGUF" + (3).to_bytes(4, "little")
BAD_MODEL_FILES = {  # what is wrong -> (file name in a model folder, its bytes)
    "safetensors header of 1 TiB": ("model.safetensors", _u64(1 << 40) + b"{}"),
    "safetensors header not JSON": ("model.safetensors", _u64(9) + b"{not json"),
    "safetensors of 2 bytes": ("model.safetensors", b"\x01\x02"),
    "safetensors tensor past the end": ("model.safetensors", _u64(79) + json.dumps(
        {"w": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 1 << 32]}}).encode().ljust(79)),
    "safetensors shape unlike its bytes": ("model.safetensors", _u64(73) + json.dumps(
        {"w": {"dtype": "F32", "shape": [100, 100], "data_offsets": [0, 16]}}).encode().ljust(73) + bytes(16)),
    "config.json not JSON": ("config.json", b'{"model_type": "llama",'),
    "index shard ../outside": ("model.safetensors.index.json", b'{"weight_map": {"w": "../x.safetensors"}}'),
    "index shard /etc/passwd": ("model.safetensors.index.json", b'{"weight_map": {"w": "/etc/passwd"}}'),
    "GGUF with 2^60 tensors": ("x.gguf", _GGUF3 + _u64(1 << 60) + _u64(0)),
    "GGUF string of 2^50 bytes": ("x.gguf", _GGUF3 + _u64(0) + _u64(1) + _u64(1 << 50)),
    "GGUF array of 2^40 items": ("x.gguf", _GGUF3 + _u64(0) + _u64(1) + _u64(1) + b"a" + struct.pack("<II", 9, 10)
                                 + _u64(1 << 40)),
    "GGUF bad magic": ("x.gguf", b"GGML" + bytes(20)),
    "GGUF cut inside its header": ("x.gguf", _GGUF3 + bytes(4)),
}
