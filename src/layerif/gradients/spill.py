"""Gradient factors spilled to disk during a pass and memory-mapped back one batch chunk at a time.

One file per layer (and per sample set); each batch appends its x and delta blocks. Matrices that read
the same input tensor (q/k/v, gate/up) share one x block. Reading maps only the bytes of one chunk, so
resident memory holds one chunk per matrix at a time, whatever the number of samples.
Every file's SHA-256 is taken as it is written and kept in `checksums.json`; a file is checked against it
before its layer is scored, so a truncated or damaged file raises `SpillCorrupt` instead of being used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from layerif.errors import LayerIFError
from layerif.gradients.factors import FactorChunk, MatrixFactors
from layerif.io import FULL, atomic_write_json, file_sha256, io_error

CHECKSUMS = "checksums.json"


class SpillCorrupt(LayerIFError):
    """A spill file no longer matches the checksum taken when it was written."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"spilled gradients {path} are {why}")
        self.path = path


def write_block(handle, data: memoryview) -> None:
    """Append one block to an open spill file (the one place spill bytes are written)."""
    handle.write(data)


@dataclass(frozen=True)
class _Block:
    offset: int
    shape: tuple[int, ...]


@dataclass
class SpilledChunk:
    """A FactorChunk whose x and delta live in a file; each access maps just their bytes."""

    index: torch.Tensor
    path: Path
    x_block: _Block
    delta_block: _Block
    dtype: torch.dtype
    device: torch.device

    def _map(self, block: _Block) -> torch.Tensor:
        nbytes = int(np.prod(block.shape)) * self.dtype.itemsize
        if nbytes == 0:
            return torch.zeros(block.shape, dtype=self.dtype, device=self.device)
        # copy-on-write mapping: writable for torch, never written, unmapped when the tensor is freed
        raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=block.offset, shape=(nbytes,))
        tensor = torch.from_numpy(raw).view(self.dtype).view(block.shape)
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    @property
    def x(self) -> torch.Tensor:
        return self._map(self.x_block)

    @property
    def delta(self) -> torch.Tensor:
        return self._map(self.delta_block)


class _BackgroundWriter:
    """Appends byte blocks to open files on one thread, so disk writes overlap the passes' compute.

    At most `max_pending` bytes wait in the queue (the caller blocks beyond that); the first write error is
    kept and raised by `check` / `finish` in the caller's thread.
    """

    def __init__(self, max_pending: int = 128 << 20):
        self.max_pending = max_pending
        self.pending = 0
        self.queue: deque = deque()
        self.error: OSError | None = None
        self.closed = False
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="layerif-spill-writer", daemon=True)
        self.thread.start()

    def put(self, handle, data: torch.Tensor, digest) -> None:
        """Queue `data` (kept alive until written) for appending to `handle`; `digest` is updated with its bytes."""
        nbytes = data.numel() * data.element_size()
        with self.condition:
            while self.pending and self.pending + nbytes > self.max_pending and self.error is None:
                self.condition.wait()
            self.queue.append((handle, data, digest))
            self.pending += nbytes
            self.condition.notify_all()

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.queue and not self.closed:
                    self.condition.wait()
                if not self.queue:
                    return
                handle, data, digest = self.queue.popleft()
            try:
                if self.error is None:
                    raw = data.view(torch.uint8).numpy().data
                    write_block(handle, raw)
                    digest.update(raw)
            except OSError as exc:
                self.error = exc
            with self.condition:
                self.pending -= data.numel() * data.element_size()
                self.condition.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Write everything queued and stop the thread."""
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        self.thread.join()
        self.check()


class SpillStore:
    """Append-only per-layer factor files under `directory` (removed by `close`)."""

    def __init__(self, directory: str | Path | None = None, prefix: str = "factors"):
        root = Path(directory) if directory is not None else None
        try:
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
            remove_stale_spills(root or Path(tempfile.gettempdir()))
            self.directory = Path(tempfile.mkdtemp(prefix=f".layerif-spill-{os.getpid()}-", dir=root))
        except OSError as exc:
            raise LayerIFError(f"cannot write spilled gradients under {root or tempfile.gettempdir()}: "
                               f"{exc.strerror or exc}") from None
        self.prefix = prefix
        self._files: dict[tuple[str, int], object] = {}
        self._sizes: dict[tuple[str, int], int] = {}
        self._digests: dict[tuple[str, int], object] = {}
        self._checksums: dict[str, str] = {}  # file name -> sha256, once writing is finished
        self._verified: set[tuple[str, int]] = set()
        self._chunks: dict[tuple[str, int, int], list[SpilledChunk]] = {}
        self._writer: _BackgroundWriter | None = None

    def path(self, part: str, layer: int) -> Path:
        return self.directory / f"{self.prefix}-{part}-{layer:04d}.bin"

    def _write_failed(self, exc: OSError) -> Exception:
        if exc.errno in FULL:
            return LayerIFError(f"writing spilled gradients to {self.directory} failed: {exc.strerror or exc} "
                                "(free some disk, or pick another place with --spill-dir)")
        return io_error(self.directory, exc, "write spilled gradients to")

    def _append(self, part: str, layer: int, tensor: torch.Tensor) -> _Block:
        key = (part, layer)
        handle = self._files.get(key)
        if handle is None:
            handle = open(self.path(part, layer), "ab")  # noqa: SIM115 - kept open for the whole pass
            self._files[key] = handle
            self._sizes.setdefault(key, 0)
            self._digests.setdefault(key, hashlib.sha256())
        if self._writer is None:
            self._writer = _BackgroundWriter()
        offset = self._sizes[key]
        data = tensor.detach().contiguous()
        if data.numel():
            try:
                self._writer.check()
            except OSError as exc:
                raise self._write_failed(exc) from None
            self._writer.put(handle, data.cpu(), self._digests[key])
            self._sizes[key] += data.numel() * data.element_size()
        return _Block(offset, tuple(data.shape))

    def write(self, part: str, layer: int, position: int, chunk: FactorChunk, cache: dict) -> None:
        """Append one batch's factors of matrix `position`; `cache` is the pass's per-batch dict."""
        index, x, delta = chunk.index, chunk.x, chunk.delta
        written = cache.setdefault("spilled_inputs", {})
        key = (part, layer, x.data_ptr(), tuple(x.shape), x.dtype)
        x_block = written.get(key)
        if x_block is None:
            x_block = written[key] = self._append(part, layer, x)
        delta_block = self._append(part, layer, delta.to(x.dtype))
        chunk = SpilledChunk(index.clone(), self.path(part, layer), x_block, delta_block, x.dtype, x.device)
        self._chunks.setdefault((part, layer, position), []).append(chunk)

    def finish_writing(self) -> None:
        """Write what is queued, then flush and close every file (call after the pass, before reading)."""
        if self._writer is None and not self._files:
            return  # finished already (close() calls it again): checksums.json is not rewritten
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.finish()
            for handle in self._files.values():
                handle.close()
            self._checksums = {self.path(*key).name: digest.hexdigest() for key, digest in self._digests.items()}
            if self._checksums:
                atomic_write_json(self.directory / CHECKSUMS, self._checksums)
        except OSError as exc:
            raise self._write_failed(exc) from None
        finally:
            for handle in self._files.values():
                if not handle.closed:
                    handle.close()
            self._files.clear()

    def verify(self, part: str, layer: int) -> None:
        """Check one file against its size and checksum (once); raise SpillCorrupt when it does not match."""
        key = (part, layer)
        if key in self._verified or key not in self._sizes:
            return
        path = self.path(part, layer)
        try:
            size = path.stat().st_size
            if size != self._sizes[key]:
                raise SpillCorrupt(path, f"{size} bytes instead of {self._sizes[key]} (truncated or overwritten)")
            if file_sha256(path) != self._checksums.get(path.name):
                raise SpillCorrupt(path, "corrupt (their SHA-256 differs from the one taken when they were written)")
        except OSError as exc:
            raise SpillCorrupt(path, f"unreadable ({exc.strerror or exc})") from None
        self._verified.add(key)

    def prefetch(self, layer: int) -> None:
        """Ask the kernel to start reading one layer's files ahead of their use (where supported)."""
        if not hasattr(os, "posix_fadvise"):
            return
        for part in ("val", "train"):
            try:
                fd = os.open(self.path(part, layer), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def factors(self, part: str, layer: int, position: int, empty: MatrixFactors) -> MatrixFactors:
        """The spilled factors of one matrix: `empty` (its sizes and norms) given the chunks, which map from disk."""
        self.verify(part, layer)
        empty.chunks = list(self._chunks.get((part, layer, position), []))
        return empty

    def drop_layer(self, layer: int) -> None:
        """Delete one layer's files once it is scored (frees the disk as the run goes)."""
        for part in {key[0] for key in self._chunks}:
            self.path(part, layer).unlink(missing_ok=True)
        for key in [key for key in self._chunks if key[1] == layer]:
            del self._chunks[key]

    def close(self) -> None:
        """Remove every file of this store."""
        try:
            self.finish_writing()
        except LayerIFError:
            pass  # already reported by the pass that wrote; removing the files is all that is left
        self._chunks.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def remove_stale_spills(root: Path) -> None:
    """Delete spill directories left in `root` by processes that no longer run (a crash mid-run)."""
    for stale in root.glob(".layerif-spill-*-*"):
        try:
            pid = int(stale.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def disk_write_bandwidth(directory: str | Path | None, nbytes: int = 64 << 20) -> float:
    """Bytes per second of a synced sequential write of `nbytes` into `directory` (a short probe)."""
    root = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    handle, name = tempfile.mkstemp(prefix=".layerif-disk-probe-", dir=root)
    try:
        started = time.perf_counter()
        with os.fdopen(handle, "wb") as out:
            for _ in range(max(1, nbytes >> 20)):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        return nbytes / max(time.perf_counter() - started, 1e-6)
    finally:
        os.unlink(name)


def free_disk_bytes(directory: str | Path | None) -> int:
    """Free bytes on the file system that would hold the spill files."""
    root = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    while not root.exists():
        root = root.parent
    return shutil.disk_usage(root).free
