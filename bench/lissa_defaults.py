"""LiSSA's defaults against `exact` on a random 4-block Llama (24 x 6 rows), beside the earlier depth-200 setting.

For each seed (model, train rows, validation rows) it reports the S_all error (largest layer difference over the
largest |S_all| of `exact`), the scoring time, the steps the recursions took and how many matrices converged.

    python bench/lissa_defaults.py                     # writes bench/results/lissa_defaults.md (about a minute)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"earlier (depth 200, 16-sample batches, no tolerance)": {"lissa_depth": 200, "lissa_batch": 16,
                                                                     "lissa_tol": 0.0},
            "defaults": {}}


def measure(seeds: tuple[int, int, int]) -> list[str]:
    """Table rows for one seed triple."""
    sys.path.insert(0, str(REPO))
    from layerif.api import ScoreConfig, score_layers
    from tests.conftest import TinyTokenizer, tiny_llama, tiny_texts

    train, val = tiny_texts(24, seed=seeds[1]), tiny_texts(6, seed=seeds[2])

    def run(**settings):
        started = time.perf_counter()
        scores = score_layers(tiny_llama(layers=4, seed=seeds[0]), TinyTokenizer(), train, val,
                              ScoreConfig(quiet=True, **settings))
        return scores, time.perf_counter() - started

    run(estimator="datainf")  # warm-up
    exact, exact_s = run(estimator="exact")
    reference = exact.scores("S_all")
    rows = []
    for label, settings in SETTINGS.items():
        scores, seconds = run(estimator="lissa", **settings)
        error = abs(scores.scores("S_all") - reference).max() / abs(reference).max()
        summary = scores.metadata["convergence"]
        rows.append(f"| {seeds} | {label} | {100 * error:.2f} % | {seconds:.2f} | {summary['steps_mean']:.0f} / "
                    f"{summary['steps_max']} | {summary['matrices'] - summary['not_converged']} of "
                    f"{summary['matrices']} | {exact_s:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,0,1;1,2,3;5,6,7", help="model,train,val seed triples, ';'-separated")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "lissa_defaults.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # thousands of tiny steps: more threads only add contention
    from layerif.io import atomic_write_text

    lines = ["# LiSSA defaults on a tiny model", "",
             f"Command: `{('python bench/lissa_defaults.py ' + ' '.join(argv if argv is not None else sys.argv[1:])).strip()}`"
             f" (one torch thread; 1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at the start:"
             " above the CPU count, other work shared the machine and the times are upper bounds; the errors and"
             " step counts do not depend on load)", "",
             "| seeds | LiSSA setting | S_all error vs exact | time (s) | steps mean / max | converged | "
             "exact time (s) |", "|---|---|---|---|---|---|---|"]
    for triple in args.seeds.split(";"):
        lines += measure(tuple(int(x) for x in triple.split(",")))
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
