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

import torch

from layerif.errors import LayerIFError
from layerif.io import atomic_save_tensors, atomic_write_json

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))

    def open(self, overwrite: bool = False) -> Checkpoint:
        """Start fresh or pick up an existing checkpoint made with the same fingerprint."""
        manifest_path = self.directory / MANIFEST
        if overwrite:
            shutil.rmtree(self.directory, ignore_errors=True)
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text())
                previous, units = manifest["digest"], dict(manifest["units"])
            except (ValueError, KeyError, TypeError):
                self.warn(f"checkpoint manifest {manifest_path} is unreadable; starting over")
                shutil.rmtree(self.directory, ignore_errors=True)
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
                          {"digest": self.digest, "fingerprint": self.fingerprint, "units": self.units})

    def has(self, name: str) -> bool:
        """True when the unit was saved and its file is intact (a damaged one is reported and dropped)."""
        if name not in self.units:
            return False
        path = self.directory / f"{name}.safetensors"
        if not path.is_file() or _sha256(path) != self.units[name]:
            self.warn(f"checkpoint unit {name} is missing or corrupt; recomputing it")
            self.units.pop(name)
            self.recomputed.append(name)
            path.unlink(missing_ok=True)
            self._write_manifest()
            return False
        return True

    def load(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of a saved unit (call `has` first)."""
        from safetensors.torch import load_file

        self.loaded.append(name)
        return load_file(str(self.directory / f"{name}.safetensors"))

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Save a unit atomically and record it."""
        path = self.directory / f"{name}.safetensors"
        atomic_save_tensors(path, tensors)
        self.units[name] = _sha256(path)
        self._write_manifest()

    def remove(self) -> None:
        """Delete the checkpoint (after the run's outputs are in place)."""
        shutil.rmtree(self.directory, ignore_errors=True)
