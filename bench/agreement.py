"""Estimator agreement on a real model: layer profiles and per-sample q from datainf / exact / identity / lissa / ekfac.

For each task, every estimator scores the same first --n-train training and --n-val validation rows of
`../shared/data/moe/<task>`. Reported: Spearman correlation between estimators of the S_pos layer profile
(over the L blocks), of the per-sample q (per block, averaged over blocks), the top-5 layers by S_pos, and
each estimator's wall time (one scoring run each: capture + estimator; the estimator's own share is the run
time minus identity's, whose estimator step is a single dot product per matrix). LiSSA's convergence
(relative change of G h over its last tenth of steps, worst matrix) is listed too.

    python bench/agreement.py                                     # 300 x 50, mrpc + openbookqa (hours on 2 cores)
    python bench/agreement.py --n-train 16 --n-val 4 --out /tmp/agreement.md     # smoke size
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "moe"
ESTIMATORS = ("datainf", "exact", "identity", "lissa", "ekfac")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (0 when either side is constant)."""
    from scipy.stats import spearmanr

    value = spearmanr(a.double().numpy(), b.double().numpy()).statistic
    return float(value) if value == value else 0.0


def score_task(model, tokenizer, task: str, estimators: list[str], n_train: int, n_val: int,
               batch_size: int, max_memory: str | None) -> dict:
    """Every estimator's LayerScores on one task, with wall times and LiSSA's convergence."""
    from layerif.api import ScoreConfig, score_layers
    from layerif.data import load_rows

    train = load_rows(DATA / task / "train.jsonl")[:n_train]
    val = load_rows(DATA / task / "validation.jsonl")[:n_val]
    out = {}
    for estimator in estimators:
        print(f"  {task}: {estimator} ...", flush=True)
        started = time.perf_counter()
        scores = score_layers(model, tokenizer, train, val,
                              ScoreConfig(estimator=estimator, batch_size=batch_size, max_memory=max_memory,
                                          quiet=True))
        seconds = time.perf_counter() - started
        info = scores.metadata.get("estimator_info") or {}
        worst = max((entry.get("relative_change", 0.0) for entry in info.values()), default=None)
        out[estimator] = {"q": scores.q.double(), "seconds": seconds,
                          "influence_s": scores.metadata["timings"].get("influence_s", seconds),
                          "plan": scores.metadata["plan"]["mode"], "lissa_worst_change": worst}
        print(f"    {seconds:.1f} s", flush=True)
    return out


def agreement_tables(task: str, results: dict) -> list[str]:
    """Markdown for one task: profile and per-sample Spearman matrices, times, top layers."""
    names = list(results)
    profiles = {name: results[name]["q"].clamp(min=0).sum(1) for name in names}
    lines = [f"## {task}", "", "Spearman of S_pos layer profiles (upper) and mean per-block Spearman of per-sample q "
             "(lower):", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, a in enumerate(names):
        cells = []
        for j, b in enumerate(names):
            if i == j:
                cells.append("1")
            elif j > i:
                cells.append(f"{spearman(profiles[a], profiles[b]):.3f}")
            else:
                qa, qb = results[a]["q"], results[b]["q"]
                cells.append(f"{sum(spearman(qa[layer], qb[layer]) for layer in range(qa.shape[0])) / qa.shape[0]:.3f}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    base = results.get("identity", {}).get("influence_s")
    lines += ["", "| estimator | run time (s) | influence step (s) | over identity (s) | plan | top-5 layers (S_pos) | "
              "LiSSA worst relative change |", "|---|---|---|---|---|---|---|"]
    for name in names:
        entry = results[name]
        top = torch.argsort(profiles[name], descending=True)[:5].tolist()
        extra = f"{entry['influence_s'] - base:.1f}" if base is not None else "-"
        change = "-" if entry["lissa_worst_change"] is None else f"{entry['lissa_worst_change']:.2e}"
        lines.append(f"| {name} | {entry['seconds']:.1f} | {entry['influence_s']:.1f} | {extra} | {entry['plan']} | "
                     f"{top} | {change} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="mrpc,openbookqa")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "agreement.md"))
    args = parser.parse_args(argv)
    tasks = [task for task in args.tasks.split(",") if task]
    missing = [task for task in tasks if not (DATA / task / "train.jsonl").is_file()]
    if missing:
        sys.exit(f"benchmark data not found for {', '.join(missing)} under {DATA}")
    from layerif.io import atomic_write_text
    from layerif.models import load_model

    loaded = load_model(args.model, quiet=True)
    command = "python bench/agreement.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Estimator agreement", "", f"Command: `{command.strip()}` (torch threads: {torch.get_num_threads()})", "",
             f"Model {args.model}, first {args.n_train} training x {args.n_val} validation rows per task, full space, "
             "all modules, S_pos. Each estimator is one scoring run (its own gradient capture).", ""]
    for task in tasks:
        results = score_task(loaded.model, loaded.tokenizer, task, args.estimators.split(","), args.n_train,
                             args.n_val, args.batch_size, args.max_memory)
        lines += agreement_tables(task, results)
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
