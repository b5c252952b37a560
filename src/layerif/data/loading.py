"""Read task rows from JSONL / JSON / CSV files or a `datasets` name, and build each row's text."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from layerif.errors import LayerIFError
from layerif.io import file_sha256  # noqa: F401 - layerif.data.file_sha256 (run.json ties a run to its data)

TEXT_FIELDS = ("instruction", "input", "output")


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as handle:
                for line_no, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise LayerIFError(f"{path}: line {line_no} is not valid JSON at column {exc.colno} "
                                              f"({exc.msg.removesuffix(' at')})") from exc
            return rows
        if suffix == ".json":
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            if isinstance(data, dict):
                # {"data": [...]} or {"train": [...]} style wrappers
                lists = [value for value in data.values() if isinstance(value, list)]
                if len(lists) != 1:
                    raise LayerIFError(f"{path}: expected a JSON list of rows (or an object holding one list)")
                data = lists[0]
            if not isinstance(data, list):
                raise LayerIFError(f"{path}: expected a JSON list of rows")
            return data
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as handle:
                return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    except json.JSONDecodeError as exc:
        raise LayerIFError(f"{path}: line {exc.lineno} is not valid JSON at column {exc.colno} "
                          f"({exc.msg.removesuffix(' at')})") from exc
    except UnicodeDecodeError as exc:
        raise LayerIFError(f"{path}: not UTF-8 text") from exc
    raise LayerIFError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .tsv")


def _load_dataset(name: str, split: str, quiet: bool = False) -> list[dict]:
    import datasets

    if quiet:
        datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types; report the first line only
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayerIFError(f"cannot load dataset {name!r} split {split!r}: {message}") from exc
    finally:
        if quiet:
            datasets.enable_progress_bars()
    return [dict(row) for row in dataset]


def check_source(source: str | Path, split: str | None = None) -> None:
    """Refuse a data source that cannot exist, before any loading."""
    path = Path(source)
    if not (path.is_file() or path.is_dir() or split is not None):
        raise LayerIFError(f"data file not found: {source} (for a hub dataset, also pass its split)")


def load_rows(source: str | Path, split: str | None = None, quiet: bool = False) -> list[dict]:
    """Rows of a local file, or of a `datasets` dataset (hub name or local folder) with `split`."""
    path = Path(source)
    check_source(source, split)
    if path.is_file():
        rows = _read_file(path)
    else:
        rows = _load_dataset(str(source), split or "train", quiet)
    if not rows:
        raise LayerIFError(f"{source}{f' [{split}]' if split else ''}: no rows")
    columns = set(rows[0])
    if "text" not in columns and not {"instruction", "output"} <= columns:
        raise LayerIFError(
            f"{source}: rows need a 'text' column or 'instruction'/'input'/'output' columns; found {sorted(columns)}"
        )
    return rows


def row_text(row: dict) -> str:
    """Training text of a row: `text`, or instruction + input + output (newline-joined when needed)."""
    if "text" in row and row["text"] is not None and not ({"instruction", "output"} <= set(row)):
        return str(row["text"])
    text = ""
    for field in TEXT_FIELDS:
        part = row.get(field) or ""
        part = str(part)
        if not part:
            continue
        if text and not text[-1].isspace():
            text += "\n"
        text += part
    return text


def select_rows(rows: list[dict], n: int | None, seed: int | None = None, what: str = "rows") -> list[dict]:
    """First n rows (the paper's choice), or a random subset of n when a seed is given."""
    if n is None:
        return list(rows)
    if n <= 0:
        raise LayerIFError(f"the number of {what} must be positive, got {n}")
    if n > len(rows):
        raise LayerIFError(f"asked for {n} {what} but the data has only {len(rows)}")
    if seed is None:
        return list(rows[:n])
    order = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[i] for i in sorted(order)]
