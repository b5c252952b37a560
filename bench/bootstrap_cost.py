"""Seconds of `--bootstrap B` on stored q of the sizes a real run produces (no model needed).

q is drawn at random in the shape [layers, n_train] (SmolLM2-135M has 30 blocks; the paper scores 300
training rows); the bootstrap's cost depends only on the shape and B. Compare with a run's total seconds
(`run.json` → `timings_s`) to read off its share; `layerif score --bootstrap B` records the same figure as
`timings_s.bootstrap_s`.

    python bench/bootstrap_cost.py [--layers 30] [--n-train 300,1200,5000] [--resamples 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from layerif.scores import bootstrap_scores


def main() -> None:
    """Time bootstrap_scores for each n_train and print one JSON line per size (best of --repeats)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--n-train", default="300,1200,5000")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for n in (int(value) for value in args.n_train.split(",")):
        q = torch.randn(args.layers, n, generator=torch.Generator().manual_seed(0)) + 0.5
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            bootstrap_scores(q, args.resamples, seed=0)
            seconds.append(time.perf_counter() - started)
        print(json.dumps({"layers": args.layers, "n_train": n, "resamples": args.resamples,
                          "seconds_best": round(min(seconds), 3), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
