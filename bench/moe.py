"""LoRA-MoE benchmark: LayerIF expert allocation against MoLA, AlphaLoRA, uniform and reversed at one budget.

A preset over `layerif compare moe` (one comparison per task, one training seed): SmolLM2-135M on MRPC, CoLA,
RTE, OpenBookQA and CommonsenseQA (../shared/data/moe). Per task: LayerIF scores from the first train x
validation rows, then one LoRA-MoE per allocation (5 experts per layer on average, top-2, rank 8) trained on
the same rows with the same seed, and a plain LoRA with about the same number of trainable parameters.
Accuracy = label log-likelihood on the first test rows.

    python bench/moe.py --quick          # the committed table (sizes below, under an hour on 2 cores)
    python bench/moe.py                  # full size: all train rows, 3 epochs, all test rows (days on a CPU)
    python bench/moe.py --standard       # the study with screens, controls and seeds (bench/moe_standard.py)

Every finished run is kept under --work, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "moe").resolve()
RESULTS = REPO / "bench" / "results"
TASKS = ("mrpc", "cola", "rte", "openbookqa", "commonsenseqa")
METHODS = "layerif,layerif:S_top25,uniform,mola-2468,mola-8642,alphalora,reversed,plain-lora"
# Quick sizes fit about an hour on a shared 2-core CPU; far too small to separate allocations: they check the
# pipeline end to end and give a first, noisy look.
QUICK = {"n_train": 64, "epochs": 1.0, "n_test": 100, "batch_size": 8, "score_train": 40, "score_val": 10}
FULL = {"n_train": None, "epochs": 3.0, "n_test": None, "batch_size": 16, "score_train": 300, "score_val": 50}
NOTES = "<!-- notes: kept when the tables are regenerated -->"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"quick size: {QUICK}")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared CPU more threads oversubscribe and run slower)")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-moe"), help="comparisons and their units")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--report-only", action="store_true", help="only write the tables from finished runs")
    parser.add_argument("--model", default="smollm2-135m", help="another (tiny) model folder, for checks")
    parser.add_argument("--standard", action="store_true", help="the standard study (bench/moe_standard.py)")
    parser.add_argument("--smoke", action="store_true", help="--standard at tiny sizes (checks the code)")
    return parser.parse_args(argv)


def comparison(task: str, size: dict, args, work: Path):
    """The `layerif compare moe` job of one task at one training seed."""
    from layerif.compare import CompareMoEJob

    n_train = size["n_train"] or sum(1 for _ in open(DATA / task / "train.jsonl", encoding="utf-8"))
    steps = max(1, math.ceil(n_train * size["epochs"] / size["batch_size"]))
    return CompareMoEJob(model=args.model, task=str(DATA / task), out=str(work / task), allocations=args.methods,
                         seeds=1, steps=steps, lr=args.lr, batch_size=size["batch_size"], n_train=size["n_train"],
                         n_test=size["n_test"], score_train=size["score_train"], score_val=size["score_val"],
                         train_on_inputs=True, dtype="float32", units=str(work / f"units-{task}"), overwrite=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.standard:
        import moe_standard

        return moe_standard.main(max(2, args.threads), args.smoke, args.model, args.report_only)
    import json

    import torch

    from layerif.compare import MoECompareResult

    torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        print(f"benchmark data not found at {DATA}", file=sys.stderr)
        return 1
    size = QUICK if args.quick else FULL
    name = "moe" if args.quick else "moe-full"
    work = Path(args.work) / name
    results = {}
    for task in [t for t in args.tasks.split(",") if t]:
        path = work / task / "compare.json"
        if args.report_only:
            if path.is_file():
                results[task] = MoECompareResult.from_dict(json.loads(path.read_text()))
            continue
        results[task] = comparison(task, size, args, work).run()
        print(f"{task}: " + ", ".join(f"{r['allocation']} {100 * r['accuracy']:.1f}" for r in results[task].runs),
              flush=True)
    write_results(Path(args.results), name, results, size, args)
    return 0


def write_results(folder: Path, name: str, results: dict, size: dict, args) -> None:
    """A markdown table (accuracy ± s.e. per method and task), the verdicts, the CSV of every run."""
    from layerif.compare.results import csv_text, table_lines
    from layerif.io import atomic_write_text

    tasks = list(results)
    methods = args.methods.split(",")
    rows, csv_rows = [], []
    for method in ["base", *methods]:
        cells, accuracies = [], []
        for task in tasks:
            result = results[task]
            if method == "base":
                accuracy = result.base["accuracy"] if result.base else None
            else:
                accuracy = next((r["accuracy"] for r in result.runs if r["allocation"] == method), None)
            n = result.setting["n_test"]
            cells.append("–" if accuracy is None else
                         f"{100 * accuracy:.1f} ± {100 * math.sqrt(accuracy * (1 - accuracy) / n):.1f}")
            if accuracy is not None:
                accuracies.append(accuracy)
        mean = f"**{100 * sum(accuracies) / len(accuracies):.1f}**" if accuracies else "–"
        params = next((r["trainable_parameters"] for result in results.values() for r in result.runs
                       if r["allocation"] == method), "–")
        rows.append([method, *cells, mean, str(params)])
    for task, result in results.items():
        csv_rows += [{"task": task, **{k: v for k, v in r.items() if k not in ("counts", "top_k")},
                      "counts": " ".join(map(str, r["counts"]))} for r in result.runs]
    first = methods[0]
    verdicts = [f"- {task}: {first} vs {v['baseline']}: **{v['reading']}**, {v['difference_points']:+.2f} "
                f"[{v['lo']:+.2f}, {v['hi']:+.2f}] points, p={v['p']:.3g}"
                for task, result in results.items() for v in result.verdicts if v["allocation"] == first]
    text = [f"# LoRA-MoE benchmark ({'quick' if name == 'moe' else name})", "",
            f"Generated by `python bench/moe.py {' '.join(sys.argv[1:])}` over `layerif compare moe` (one "
            f"training seed). SmolLM2-135M (fp32), LoRA-MoE on every projection, rank 8, alpha 16, dropout 0.05, "
            f"top-k = min(2, n_l), 5 experts per layer on average, β 2.5. Training: first "
            f"{size['n_train'] or 'all'} train rows, {size['epochs']:g} epoch(s), AdamW lr {args.lr:g}, batch "
            f"{size['batch_size']}, loss on the whole text. Accuracy: label log-likelihood on the first "
            f"{size['n_test'] or 'all'} test rows, in % ± binomial standard error. LayerIF scores: first "
            f"{size['score_train']} train x {size['score_val']} validation rows of each task. plain-lora: one LoRA "
            "per projection with about the uniform MoE's parameters. base: no adapter.", "",
            *table_lines(["method", *tasks, "mean", "params"], rows), "",
            "Verdicts (one seed: the intervals see test rows only):", "", *verdicts]
    previous = folder / f"{name}.md"
    notes = previous.read_text().split(NOTES, 1)[1] if previous.is_file() and NOTES in previous.read_text() else ""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(previous, "\n".join(text) + "\n\n" + NOTES + (notes or "\n"))
    if csv_rows:
        atomic_write_text(folder / f"{name}.csv", csv_text(csv_rows))


if __name__ == "__main__":
    sys.exit(main())
