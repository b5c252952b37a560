"""Shared machinery of the standard studies (bench/pruning.py --standard, bench/moe.py --standard).

A study is a list of units (one pruned or trained model, evaluated); each finished unit is saved as one JSON
file under the study's work folder, so an interrupted study resumes where it stopped and the tables can be
written from whatever has finished. Comparisons are paired bootstraps from `layerif.evaluate.stats`.
"""

from __future__ import annotations

import calendar
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path


class Units:
    """Finished units of a study, one JSON file each (written atomically; a killed unit leaves nothing)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._inner: list[float] = []  # seconds spent in units computed inside each open unit

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def done(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict:
        return json.loads(self.path(key).read_text())

    def get(self, key: str) -> dict | None:
        return self.load(key) if self.done(key) else None

    def run(self, key: str, compute: Callable[[], dict]) -> dict:
        """The saved record of `key`, or compute it (timed), save it and return it."""
        if self.done(key):
            return self.load(key)
        from layerif.io import atomic_write_json

        started = time.perf_counter()
        self._inner.append(0.0)
        try:
            record = compute()
        finally:
            inner = self._inner.pop()
        seconds = time.perf_counter() - started
        # a unit computed inside another (an input it needs) is timed once, as its own unit
        record["seconds"] = seconds - inner
        record["inner_unit_seconds"] = inner
        if self._inner:
            self._inner[-1] += seconds
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_json(self.path(key), record)
        print(f"[{record['finished']}] {key}: {record['seconds']:.0f} s", flush=True)
        return record

    def total_seconds(self) -> float:
        """Compute time of every finished unit (the study's wall time when it ran without pauses)."""
        records = [json.loads(path.read_text()) for path in self.folder.glob("*.json")
                   if not path.name.startswith("_")]

        def window(record: dict) -> tuple[float, float]:
            end = calendar.timegm(time.strptime(record["finished"], "%Y-%m-%dT%H:%M:%SZ"))
            return end - record["seconds"], end

        total = 0.0
        for record in records:
            total += record.get("seconds", 0.0)
            if "inner_unit_seconds" not in record and "finished" in record:
                # written before units were timed exclusively: take out the units that ran inside it
                start, end = window(record)
                total -= sum(other["seconds"] for other in records if other is not record and "finished" in other
                             and start - 1 <= window(other)[0] and window(other)[1] <= end + 1)
        return total

    def log_invocation(self, entry: dict) -> list[dict]:
        """Append one invocation (command, start/end, machine state) to _invocations.json; return all."""
        from layerif.io import atomic_write_json

        path = self.folder / "_invocations.json"
        entries = json.loads(path.read_text()) if path.is_file() else []
        entries = [e for e in entries if e.get("started") != entry.get("started")] + [entry]
        atomic_write_json(path, entries)
        return entries


def machine_state() -> dict:
    """What the numbers depend on: cores, load, memory, torch threads and versions."""
    import torch

    state = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        state["load_average"] = [round(v, 2) for v in os.getloadavg()]
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


def wall_hours(entries: list[dict]) -> float:
    """Wall time of the invocations that ran units, each from its start to its last report, in hours."""
    seconds = 0.0
    for entry in entries:
        end = entry.get("end_state", {}).get("utc")
        if end and not entry.get("report_only"):
            seconds += calendar.timegm(time.strptime(end, "%Y-%m-%dT%H:%M:%SZ")) - calendar.timegm(
                time.strptime(entry["started"], "%Y-%m-%dT%H:%M:%SZ"))
    return seconds / 3600


def describe_state(entries: list[dict]) -> str:
    """One sentence on the machine over all invocations of a study."""
    if not entries:
        return "machine state not recorded"
    first = entries[0]["state"]
    loads = [e["state"].get("load_average", [math.nan])[0] for e in entries] + \
            [e.get("end_state", {}).get("load_average", [math.nan])[0] for e in entries]
    loads = [v for v in loads if not math.isnan(v)]
    memory = f", {first['memory_total_gib']} GiB memory" if "memory_total_gib" in first else ""
    load = f"; 1-min load average {min(loads):.2f}–{max(loads):.2f} at the starts/ends of the invocations" if loads else ""
    return (f"{first['cpus']} CPUs{memory}, torch {first['torch']} with {first['torch_threads']} threads; "
            f"{len(entries)} invocation(s){load}")


def acc_text(comparison) -> str:
    """Accuracy difference in points with its interval and p-value."""
    c = comparison
    return f"{100 * c.estimate:+.2f} [{100 * c.low:+.2f}, {100 * c.high:+.2f}], p={c.p_value:.3g}"


def ppl_text(comparison) -> str:
    """Log-perplexity difference as a perplexity ratio A/B with its interval and p-value."""
    c = comparison
    return f"×{math.exp(c.estimate):.3f} [{math.exp(c.low):.3f}, {math.exp(c.high):.3f}], p={c.p_value:.3g}"


class PlannedUnits(Units):
    """Units that only record what would run (for --plan): an unfinished unit returns `placeholder`."""

    def __init__(self, folder: Path, placeholder: dict):
        self.folder = Path(folder)
        self.placeholder = placeholder
        self.planned: list[str] = []

    def run(self, key: str, compute) -> dict:
        if self.done(key):
            return self.load(key)
        if key not in self.planned:
            self.planned.append(key)
        return self.placeholder


def write_tables(results: Path, stem: str, lines: list[str], csv_rows: list[dict]) -> None:
    """Write a study's markdown report and, when any unit finished, its CSV (both atomically)."""
    import csv
    import io

    from layerif.io import atomic_write_text

    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / f"{stem}.md", "\n".join(lines) + "\n")
    if csv_rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
        atomic_write_text(results / f"{stem}.csv", buffer.getvalue())
