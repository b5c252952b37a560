"""Finished units of a comparison (one pruned model, evaluated), saved one file each so a killed run resumes.

A unit is a safetensors file in the output folder's checkpoint (arrays such as per-window NLL or a mask) with
its JSON record in the file's metadata; the checkpoint manifest lists every unit with its SHA-256, so a unit
that was cut short or damaged is recomputed, never read. The manifest also holds the fingerprint of what
decides the numbers (model, texts, sizes): a folder holding units of another configuration is refused.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from layerif.checkpoint import Checkpoint
from layerif.errors import LayerIFError

PREFIX = "compare-"  # unit files are named compare-<key>.safetensors (see checkpoint_files)


def machine_state() -> dict:
    """What timings depend on: cores, load average, memory, torch threads and versions."""
    state = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
             "python": platform.python_version()}
    try:
        state["load_average"] = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        pass
    try:
        import psutil

        memory = psutil.virtual_memory()
        state["memory_total_gib"] = round(memory.total / 2**30, 1)
        state["memory_available_gib"] = round(memory.available / 2**30, 1)
    except ImportError:
        pass
    return state


def allocation_tokens(allocations: str) -> list[str]:
    """The comma-separated names of --allocations: at least two, none twice (else one clear error)."""
    tokens = [token.strip() for token in str(allocations).split(",") if token.strip()]
    if len(tokens) < 2:
        raise LayerIFError(f"--allocations needs at least two allocations to compare, got {allocations!r}")
    if len(set(tokens)) != len(tokens):
        raise LayerIFError(f"--allocations lists an allocation twice: {allocations!r}")
    return tokens


class UnitStore:
    """Units of one comparison: `run(key, compute)` returns the saved unit or computes, times and saves it."""

    def __init__(self, directory: str | Path, fingerprint: dict, overwrite: bool = False,
                 on_saved: Callable[[str, dict], None] | None = None):
        self.checkpoint = Checkpoint(directory, fingerprint).open(overwrite=overwrite)
        self.on_saved = on_saved
        self.computed: list[str] = []

    def done(self, key: str) -> bool:
        return self.checkpoint.has(PREFIX + key)

    def get(self, key: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(record, arrays) of a finished unit, or None."""
        if not self.done(key):
            return None
        return self.checkpoint.record(PREFIX + key), self.checkpoint.load(PREFIX + key)

    def run(self, key: str, compute: Callable[[], tuple[dict, dict[str, torch.Tensor]]]) -> tuple[dict, dict]:
        """The saved (record, arrays) of `key`, or compute them, add the seconds taken, save and return them."""
        saved = self.get(key)
        if saved is not None:
            return saved
        started = time.perf_counter()
        record, arrays = compute()
        record = {**record, "seconds": round(time.perf_counter() - started, 3),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # safetensors refuses a file without tensors
        arrays = arrays or {"none": torch.zeros(1)}
        self.checkpoint.save(PREFIX + key, arrays, record)
        self.computed.append(key)
        if self.on_saved is not None:
            self.on_saved(key, record)
        return record, arrays

    def drop(self, key: str) -> None:
        self.checkpoint.drop(PREFIX + key)

    def keys(self) -> list[str]:
        """Keys of every saved unit."""
        return sorted(name[len(PREFIX):] for name in self.checkpoint.units if name.startswith(PREFIX))


def run_schedule(store: UnitStore, units: list[tuple[str, Callable, Callable[[str], bool] | None]], desc: str,
                 quiet: bool = False, after_fresh: Callable[[], None] | None = None) -> None:
    """Run (or take from `store`) every unit in order with a progress bar.

    Each unit is (key, compute, stale): a saved unit for which `stale(key)` is true was made from other inputs
    than the job now has and is recomputed; `after_fresh` runs after every unit computed here (not reused).
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(units), desc=desc, unit="unit", disable=quiet)
    for key, compute, stale in units:
        bar.set_postfix_str(key)
        if stale is not None and store.done(key) and stale(key):
            store.drop(key)
        fresh = not store.done(key)
        store.run(key, compute)
        bar.update(1)
        if fresh and after_fresh is not None:
            after_fresh()
    bar.close()


class UnitJob:
    """The run of a compare job: check, load the model, open the unit store, run every unit, write, publish.

    A job (a dataclass) gives `validate()` -> OutputFolder, `load()`, `prepare()`, `fingerprint()`,
    `schedule()`, `collect()` -> result, `write_outputs(result, folder)` and `progress_label()`, and has the
    fields `units`, `overwrite`, `quiet` and `on_unit` (called with the partial result after each new unit).
    """

    def saved_result(self):
        """The (maybe partial) result from the units already saved, running none (the model is loaded only for
        the fingerprint that ties the units to it)."""
        self.validate()
        self._state = machine_state()
        self._loaded = self.load()
        self.store = UnitStore(self.units or self.output_folder().checkpoint_dir, self.fingerprint())
        return self.collect()

    def run(self):
        """Run (or resume) every unit, then write the comparison into --out; the result."""
        folder = self.validate()
        self._state = machine_state()
        with folder:
            self._loaded = self.load()
            self.prepare()
            # --overwrite replaces --out; a separate units folder is a cache shared by comparisons: it stays
            self.store = UnitStore(self.units or folder.checkpoint_dir, self.fingerprint(),
                                   overwrite=self.overwrite and self.units is None)
            after = None if self.on_unit is None else (lambda: self.on_unit(self.collect()))
            run_schedule(self.store, self.schedule(), self.progress_label(), self.quiet, after)
            result = self.collect()
            self.write_outputs(result, folder.staging)
            folder.publish()
        return result
