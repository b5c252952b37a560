"""Crash-safe progress of a scoring run: finished units saved as safetensors, listed with hashes in a manifest.

A unit is written to a temporary file and renamed into place, and only then recorded in the manifest
(itself replaced atomically), so a kill at any moment leaves either the old state or the new one.
Every unit's SHA-256 is checked on load: a corrupt or truncated unit is reported and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from layerif.errors import LayerIFError
from layerif.io import atomic_save_tensors, atomic_write_json, file_sha256

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
FORMAT = "layerif.checkpoint/1"


def fingerprint_digest(fingerprint: dict) -> str:
    """Stable hash of what decides a run's numbers."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


class Checkpoint:
    """Saved units of one scoring run inside `directory`, valid only for the same fingerprint."""

    def __init__(self, directory: str | Path, fingerprint: dict, warn=None):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.digest = fingerprint_digest(fingerprint)
        self.units: dict[str, str] = {}
        self.loaded: list[str] = []
        self.recomputed: list[str] = []
        self._checked: set[str] = set()  # units whose file matched its checksum in this run
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))

    def open(self, overwrite: bool = False) -> Checkpoint:
        """Start fresh or pick up an existing checkpoint made with the same fingerprint."""
        manifest_path = self.directory / MANIFEST
        if self.directory.is_symlink() or (self.directory.exists() and not self.directory.is_dir()):
            raise LayerIFError(f"checkpoint folder {self.directory} is a link or not a folder; move it away")
        if manifest_path.exists() and not is_our_checkpoint(self.directory):
            raise LayerIFError(f"{self.directory} holds a manifest.json that layerif did not write; move it away")
        if overwrite:
            discard_checkpoint(self.directory)
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text())
                previous, units = manifest["digest"], dict(manifest["units"])
            except (ValueError, KeyError, TypeError):
                self.warn(f"checkpoint manifest {manifest_path} is unreadable; starting over")
                discard_checkpoint(self.directory)
            else:
                if previous != self.digest:
                    changed = sorted(
                        key for key in set(self.fingerprint) | set(manifest.get("fingerprint", {}))
                        if json.dumps(self.fingerprint.get(key), sort_keys=True, default=str)
                        != json.dumps(manifest.get("fingerprint", {}).get(key), sort_keys=True, default=str)
                    )
                    raise LayerIFError(
                        f"{self.directory.parent} holds an unfinished run with a different "
                        f"{', '.join(changed) or 'configuration'}; pass --overwrite to start over"
                    )
                self.units = units
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_manifest()
        return self

    def _write_manifest(self) -> None:
        atomic_write_json(self.directory / MANIFEST,
                          {"format": FORMAT, "digest": self.digest, "fingerprint": self.fingerprint,
                           "units": self.units})

    def has(self, name: str) -> bool:
        """True when the unit was saved and its file is intact (a damaged one is reported and dropped)."""
        if name not in self.units:
            return False
        if name in self._checked:  # hashed once per process: a study asks after its units again and again
            return True
        path = self.directory / f"{name}.safetensors"
        if not path.is_file() or file_sha256(path) != self.units[name]:
            self.warn(f"checkpoint unit {name} is missing or corrupt; recomputing it")
            self.units.pop(name)
            self.recomputed.append(name)
            path.unlink(missing_ok=True)
            self._write_manifest()
            return False
        self._checked.add(name)
        return True

    def _intact(self, name: str) -> Path:
        if name not in self._checked and not self.has(name):
            raise LayerIFError(f"checkpoint unit {name} is missing or corrupt; run the command again to recompute it")
        return self.directory / f"{name}.safetensors"

    def load(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of a saved unit (call `has` first)."""
        from safetensors.torch import load_file

        path = self._intact(name)
        self.loaded.append(name)
        return load_file(str(path))

    def save(self, name: str, tensors: dict[str, torch.Tensor], record: dict | None = None) -> None:
        """Save a unit atomically and record it (`record`: JSON kept in the file's metadata)."""
        path = self.directory / f"{name}.safetensors"
        metadata = None if record is None else {"record": json.dumps(record, default=str)}
        atomic_save_tensors(path, tensors, metadata)
        self.units[name] = file_sha256(path)
        self._checked.add(name)
        self._write_manifest()

    def record(self, name: str) -> dict:
        """The JSON record saved with a unit (call `has` first); {} when it was saved without one."""
        from safetensors import safe_open

        with safe_open(str(self._intact(name)), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return json.loads(metadata["record"]) if "record" in metadata else {}

    def drop(self, name: str) -> None:
        """Forget a unit and delete its file (work that is no longer needed)."""
        self._checked.discard(name)
        if self.units.pop(name, None) is not None:
            self._write_manifest()
        (self.directory / f"{name}.safetensors").unlink(missing_ok=True)


def _manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def is_our_checkpoint(directory: str | Path) -> bool:
    """True when `directory` holds a checkpoint manifest written by this package."""
    return _manifest(Path(directory)) is not None


def has_units(directory: str | Path) -> bool:
    """True when the checkpoint in `directory` records finished work."""
    manifest = _manifest(Path(directory))
    return bool(manifest and manifest.get("units"))


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The entries of a checkpoint folder that this package wrote: manifest, units, spill folders, temporary files."""
    directory = Path(directory)
    manifest = _manifest(directory)
    names = {MANIFEST} if manifest is not None else set()
    if manifest is not None and isinstance(manifest.get("units"), dict):
        names |= {f"{unit}.safetensors" for unit in manifest["units"]}
    found = [directory / name for name in sorted(names)]
    found += sorted(directory.glob(".layerif-spill-*-*"))  # spill folders, named by pid
    found += sorted(directory.glob(".manifest.json.*.tmp")) + sorted(directory.glob(".layer-*.safetensors.*.tmp"))
    found += sorted(directory.glob(".stream-*.safetensors.*.tmp")) + sorted(directory.glob(".compare-*.safetensors.*.tmp"))
    found += sorted(directory.glob(".layerif-disk-probe-*"))
    if manifest is not None:  # units saved before the manifest recorded them (a kill in between)
        found += sorted(directory.glob("layer-*.safetensors")) + sorted(directory.glob("stream-*.safetensors"))
        found += sorted(directory.glob("compare-*.safetensors"))
    return found


def discard_checkpoint(path: Path) -> None:
    """Delete our checkpoint files in `path` (never a user's file there), and the folder when it is then empty."""
    if not path.is_dir() or path.is_symlink():
        return
    for entry in checkpoint_files(path):
        if entry.is_symlink() or not entry.exists():
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass  # something else is in it: not ours to delete
