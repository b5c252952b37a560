"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target.

Every file layerif writes, every file fsync and every rename goes through the three primitives below
(`_write_step`, `_fsync`, `_rename`), so a test can fail any one of them. A failure becomes one line naming
the path: a full disk is the user's to fix (LayerIFError, exit 2), any other I/O error is a DiskError (exit 1).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from layerif.errors import DiskError, LayerIFError

_UMASK = os.umask(0)
os.umask(_UMASK)

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def io_error(path: str | Path, exc: OSError, doing: str = "write") -> Exception:
    """The one-line error for a failed I/O call on `path`: LayerIFError for a full disk, else DiskError."""
    why = exc.strerror or str(exc)
    if exc.errno in FULL:
        return LayerIFError(f"cannot {doing} {path}: {why} (free some disk or choose another folder; "
                            "the previous outputs are untouched)")
    return DiskError(f"cannot {doing} {path}: {why} (the previous outputs are untouched)", exc.errno)


def _write_step(write: Callable[[str], None], tmp: str) -> None:
    write(tmp)


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _rename(src: str | Path, dst: str | Path, exchange: bool = False) -> None:
    if not exchange:
        os.replace(src, dst)
        return
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        raise NotImplementedError("no renameat2 in this C library") from None
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(dst))


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable; best effort, since the rename itself is already complete."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; failing now would misreport a finished rename
    finally:
        os.close(fd)


def rename(src: str | Path, dst: str | Path) -> None:
    """Rename `src` onto `dst` (replacing a file there), then sync the folder; one-line error on failure."""
    try:
        _rename(src, dst)
        fsync_dir(Path(dst).parent)
    except OSError as exc:
        raise io_error(dst, exc, "rename into") from None


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        _rename(a, b, exchange=True)
        fsync_dir(Path(b).parent)
    except NotImplementedError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            return False
        raise io_error(b, exc, "switch in") from None
    return True


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) and rename the result onto `path`; nothing is left behind on failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_path = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise io_error(path, exc) from None
    os.close(handle)
    try:
        _write_step(write, tmp_path)
        with open(tmp_path, "rb") as written:
            _fsync(written.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        _rename(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp_path)
        raise io_error(path, exc) from None
    except BaseException:
        _unlink_quietly(tmp_path)
        raise
    return path


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: object) -> Path:
    """Write JSON (indented, UTF-8) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of tensors as safetensors atomically (serialised here, so a write error is an OSError)."""
    from safetensors.torch import save

    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    return atomic_write_bytes(path, save(contiguous, metadata=metadata))


def atomic_savefig(path: str | Path, figure) -> Path:
    """Save a matplotlib figure atomically (format from the target's suffix)."""
    suffix = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format=suffix, dpi=120, bbox_inches="tight"))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
