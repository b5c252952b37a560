"""Gradient factors spilled to disk during a pass and memory-mapped back one batch chunk at a time.

One file per layer (and per sample set); each batch appends its x and delta blocks. Matrices that read
the same input tensor (q/k/v, gate/up) share one x block. Reading maps only the bytes of one chunk, so
resident memory holds one chunk per matrix at a time, whatever the number of samples.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from layerif.errors import LayerIFError
from layerif.gradients.factors import MatrixFactors


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
        self._chunks: dict[tuple[str, int, int], list[SpilledChunk]] = {}

    def path(self, part: str, layer: int) -> Path:
        return self.directory / f"{self.prefix}-{part}-{layer:04d}.bin"

    def _append(self, part: str, layer: int, tensor: torch.Tensor) -> _Block:
        handle = self._files.get((part, layer))
        if handle is None:
            handle = open(self.path(part, layer), "ab")  # noqa: SIM115 - kept open for the whole pass
            self._files[(part, layer)] = handle
        offset = handle.tell()
        data = tensor.detach().contiguous()
        if data.numel():
            try:
                handle.write(data.cpu().view(torch.uint8).numpy().data)
            except OSError as exc:
                raise LayerIFError(f"writing spilled gradients to {self.directory} failed: {exc.strerror or exc} "
                                   "(free some disk, or pick another place with --spill-dir)") from None
        return _Block(offset, tuple(data.shape))

    def write(self, part: str, layer: int, position: int, index: torch.Tensor, x: torch.Tensor,
              delta: torch.Tensor, cache: dict) -> None:
        """Append one batch's factors of matrix `position`; `cache` is the pass's per-batch dict."""
        written = cache.setdefault("spilled_inputs", {})
        key = (part, layer, x.data_ptr(), tuple(x.shape), x.dtype)
        x_block = written.get(key)
        if x_block is None:
            x_block = written[key] = self._append(part, layer, x)
        delta_block = self._append(part, layer, delta.to(x.dtype))
        chunk = SpilledChunk(index.clone(), self.path(part, layer), x_block, delta_block, x.dtype, x.device)
        self._chunks.setdefault((part, layer, position), []).append(chunk)

    def finish_writing(self) -> None:
        """Flush and close every file (call after the pass, before reading)."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def factors(self, part: str, layer: int, position: int, n: int, d_in: int, d_out: int,
                compute_dtype: torch.dtype, sq_norms: torch.Tensor) -> MatrixFactors:
        """The spilled factors of one matrix as MatrixFactors (its chunks map from disk on use)."""
        factors = MatrixFactors(n, d_in, d_out, compute_dtype, sq_norms=sq_norms)
        factors.chunks = list(self._chunks.get((part, layer, position), []))
        return factors

    def drop_layer(self, layer: int) -> None:
        """Delete one layer's files once it is scored (frees the disk as the run goes)."""
        for part in {key[0] for key in self._chunks}:
            self.path(part, layer).unlink(missing_ok=True)
        for key in [key for key in self._chunks if key[1] == layer]:
            del self._chunks[key]

    def close(self) -> None:
        """Remove every file of this store."""
        self.finish_writing()
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
