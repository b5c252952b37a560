"""Results files of a study made of `layerif compare` runs: one markdown page, one CSV, one figure."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path


def machine_line(results: dict) -> str:
    """Cores, memory, torch threads and the load averages seen at the starts of the comparisons."""
    from layerif.compare.units import machine_state

    states = [r.setting.get("machine") or {} for r in results.values()] + [machine_state()]
    loads = [s["load_average"][0] for s in states if s.get("load_average")]
    first = states[0]
    memory = f", {first['memory_total_gib']} GiB memory" if "memory_total_gib" in first else ""
    return (f"{first.get('cpus', os.cpu_count())} CPUs{memory}, torch {first.get('torch')} with "
            f"{first.get('torch_threads')} threads; 1-min load average {min(loads):.2f}–{max(loads):.2f} at the "
            "starts of the comparisons and at this write")


def write_study(folder: Path, stem: str, results: dict, command: str, started: str, wall_s: float,
                order: list[str], tail: list[str] = ()) -> None:
    """`stem`.md / .csv / .png in `folder` from {comparison folder: CompareResult} (partial results included).

    A hand-written `stem`.notes.md in `folder` (machine state of the sessions that ran it, and the readings written
    from the finished settings) is put under the title; `tail` (markdown lines) goes after the tables.
    """
    from layerif.compare.results import markdown, run_rows
    from layerif.io import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(results, key=lambda name: (order.index(name.removesuffix("-variants"))
                                              if name.removesuffix("-variants") in order else len(order), name))
    complete = bool(names) and all(results[name].complete for name in names) and \
        all(name in results for name in order)
    compute_h = sum(r.seconds for r in results.values()) / 3600
    lines = [f"# Pruning study — {stem}", ""]
    # What the machine was doing, and what the numbers say, is known to whoever ran it, not to the units: kept by
    # hand beside the tables.
    notes = folder / f"{stem}.notes.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += [f"Command: `{command}`. This invocation started {started}, {wall_s / 3600:.2f} h ago; compute time of "
             f"the finished units {compute_h:.2f} h (wall-clock seconds per unit, over every session that ran one; other "
             f"work on the machine counts in them, see the load averages). "
             f"Machine: {machine_line(results) if results else 'n/a'}.", ""]
    if not complete:
        lines += ["**Partial tables**: the study has not finished; every number below is final for the runs it "
                  "shows, missing rows are still to run.", ""]
    rows = []
    for name in names:
        lines += markdown(results[name], heading="##")
        rows += [{"comparison": name, **row} for row in run_rows(results[name])]
    lines += list(tail)
    atomic_write_text(folder / f"{stem}.md", "\n".join(lines) + "\n")
    if rows:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(folder / f"{stem}.csv", buffer.getvalue())
        write_figure(folder / f"{stem}.png", {name: results[name] for name in names})


def write_figure(path: Path, results: dict) -> None:
    """Per comparison: test perplexity of every run (one dot per seed) and the first run's block ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerif.io import atomic_savefig

    figure, axes = plt.subplots(len(results), 2, figsize=(13, 4 * len(results)), squeeze=False)
    for row, (name, result) in enumerate(results.items()):
        labels = [arm["allocation"] for arm in result.arms]
        for position, label in enumerate(labels):
            runs = [r for r in result.runs if r["allocation"] == label]
            axes[row][0].scatter([position] * len(runs), [r["test_ppl"] for r in runs], s=14)
            if runs:
                axes[row][1].plot(runs[0]["block_ratios"], marker=".", label=label)
        axes[row][0].set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        axes[row][0].set_title(f"{name}: test perplexity, every run")
        axes[row][1].set_title(f"{name}: per-block ratios (chosen ε, first seed)")
        axes[row][1].set_xlabel("block")
        axes[row][1].legend(fontsize=7)
    figure.tight_layout()
    atomic_savefig(path, figure)
    plt.close(figure)
