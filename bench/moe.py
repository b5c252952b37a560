"""LoRA-MoE benchmark: LayerIF expert allocation against MoLA, AlphaLoRA, uniform and reversed at one budget.

SmolLM2-135M on MRPC, CoLA, RTE, OpenBookQA and CommonsenseQA (../shared/data/moe). Per task: LayerIF scores
from the first 300 train x 50 validation rows, then one LoRA-MoE per allocation (5 experts per layer on
average, top-2, rank 8) trained on the same rows with the same seed, and a plain LoRA with about the same
number of trainable parameters. Accuracy = label log-likelihood on the first test rows.

    python bench/moe.py --quick          # the committed table (sizes below, under an hour on 2 cores)
    python bench/moe.py                  # full size: all train rows, 3 epochs, all test rows (days on a CPU)
    python bench/moe.py --standard       # the study with controls, seeds and paired statistics (bench/moe_standard.py)

Every finished run is cached under --work (scores, allocations, per-run results), so an interrupted
benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "moe").resolve()
RESULTS = REPO / "bench" / "results"
TASKS = ("mrpc", "cola", "rte", "openbookqa", "commonsenseqa")
METHODS = ("layerif-S_pos", "layerif-S_top25", "uniform", "mola-2468", "mola-8642", "alphalora", "reversed",
           "plain-lora")
# Quick sizes fit about an hour on a shared 2-core CPU (measured: ~1.3 s per training row and ~0.35 s per
# test row with one thread; DataInf scoring of 40 x 10 rows ~3-4 min per task). Far too small to separate
# allocations; they check the pipeline end to end and give a first, noisy look.
QUICK = {"n_train": 64, "epochs": 1.0, "n_test": 100, "batch_size": 8, "score_train": 40, "score_val": 10}
FULL = {"n_train": None, "epochs": 3.0, "n_test": None, "batch_size": 16, "score_train": 300, "score_val": 50}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"quick size: {QUICK}")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n-train", type=int, help="training rows per task (first n)")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--n-test", type=int, help="test rows per task (first n)")
    parser.add_argument("--experts-per-layer", type=int, default=5, help="budget T = this x number of layers")
    parser.add_argument("--beta", type=float, default=2.5)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--score-train", type=int, help="train rows for LayerIF scoring (paper: 300)")
    parser.add_argument("--score-val", type=int, help="validation rows for LayerIF scoring (paper: 50)")
    parser.add_argument("--report-only", action="store_true", help="only write the tables from cached runs")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="rows per forward (default: the largest that fits half the free memory)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared CPU more threads oversubscribe and run slower)")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-moe"), help="cache of scores and runs")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--name", help="results file stem (default moe, or moe-full without --quick)")
    parser.add_argument("--standard", action="store_true",
                        help="the standard study: validation curves, controls, 3 seeds, paired statistics (hours)")
    parser.add_argument("--smoke", action="store_true", help="--standard at tiny sizes (checks the code)")
    parser.add_argument("--plan", action="store_true", help="--standard: list the units left with projected time")
    parser.add_argument("--model", default="smollm2-135m", help="--standard --smoke: another (tiny) model folder")
    return parser.parse_args()


def rows_of(task: str, split: str) -> list[dict]:
    from layerif.data import load_rows

    return load_rows(DATA / task / f"{split}.jsonl")


def task_scores(base, tokenizer, task: str, work: Path, n_train: int, n_val: int):
    """LayerIF scores of one task (cached): first n_train x n_val rows, DataInf, all block weights."""
    from layerif import ScoreConfig, score_layers
    from layerif.scores import LayerScores

    directory = work / "scores" / f"{task}-{n_train}x{n_val}"
    if (directory / "influence.safetensors").is_file():
        return LayerScores.load(directory), json.loads((directory / "timing.json").read_text())["seconds"]
    started = time.perf_counter()
    scores = score_layers(base, tokenizer, rows_of(task, "train"), rows_of(task, "validation"),
                          ScoreConfig(n_train=n_train, n_val=n_val, quiet=True))
    seconds = time.perf_counter() - started
    scores.save(directory)
    (directory / "timing.json").write_text(json.dumps({"seconds": seconds}))
    return scores, seconds


def plain_lora_rank(base, target_params: int, rank_unit: int = 1) -> int:
    """Rank of a plain LoRA on every projection with about `target_params` trainable parameters."""
    from layerif.models import select_matrices

    per_rank = sum(ref.d_in + ref.d_out for refs in select_matrices(base, "all") for ref in refs)
    return max(1, round(target_params / per_rank / rank_unit) * rank_unit)


def main() -> int:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if args.standard:
        import moe_standard

        return moe_standard.main(max(2, args.threads), args.smoke, args.model, args.plan, args.report_only)
    from layerif.allocate.experts import ExpertAllocation, allocate_experts, model_alphas
    from layerif.evaluate.labels import loglik_accuracy
    from layerif.io import atomic_write_json
    from layerif.models import find_blocks, load_model
    from layerif.moe import MoEConfig, TrainConfig, expected_parameters
    from layerif.moe.pipeline import train_adapter

    if not DATA.is_dir():
        print(f"benchmark data not found at {DATA}", file=sys.stderr)
        return 1
    size = dict(QUICK if args.quick else FULL)
    for key in ("n_train", "epochs", "n_test", "batch_size", "score_train", "score_val"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    name = args.name or ("moe" if args.quick else "moe-full")
    work = Path(args.work) / name
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]

    started_all = time.perf_counter()
    loaded = load_model("smollm2-135m", dtype="float32", quiet=True)
    base, tokenizer = loaded.model, loaded.tokenizer
    n_layers = len(find_blocks(base)[1])
    budget = args.experts_per_layer * n_layers
    alphas = model_alphas(base)
    reference = MoEConfig(counts=allocate_experts("uniform", n_layers, budget).counts)
    lora_rank = plain_lora_rank(base, expected_parameters(base, reference))
    args.batch_size = size["batch_size"]
    train_config = TrainConfig(epochs=size["epochs"], lr=args.lr, batch_size=args.batch_size,
                               micro_batch_size=None if args.micro_batch_size is None else min(args.micro_batch_size, args.batch_size),
                               seed=args.seed)

    records, allocations, scoring_seconds = [], {}, {}
    for task in tasks:
        if args.report_only:
            timing = Path(args.work) / "scores" / f"{task}-{size['score_train']}x{size['score_val']}" / "timing.json"
            if timing.is_file():
                scoring_seconds[task] = json.loads(timing.read_text())["seconds"]
            records += [json.loads(p.read_text()) for p in sorted((work / "runs" / task).glob("*/result.json"))]
            for record in records:
                if record["task"] == task and record.get("counts"):
                    allocations[(task, record["method"])] = record["counts"]
            continue
        scores, scoring_seconds[task] = task_scores(base, tokenizer, task, Path(args.work), size["score_train"],
                                                    size["score_val"])
        train_rows = rows_of(task, "train")
        train_rows = train_rows[: size["n_train"]] if size["n_train"] else train_rows
        test_rows = rows_of(task, "test")
        test_rows = test_rows[: size["n_test"]] if size["n_test"] else test_rows
        for method in ["base", *methods]:
            result_path = work / "runs" / task / method / "result.json"
            if result_path.is_file():
                record = json.loads(result_path.read_text())
                records.append(record)
                if record.get("counts"):
                    allocations[(task, method)] = record["counts"]
                print(f"[cached] {task:14s} {method:16s} acc {record['accuracy']:.3f}", flush=True)
                continue
            model = copy.deepcopy(base)
            loaded_copy = copy.copy(loaded)
            loaded_copy.model = model
            record = {"task": task, "method": method, "n_train": len(train_rows), "n_test": len(test_rows),
                      "epochs": size["epochs"]}
            if method != "base":
                moe_options = {}
                if method.startswith("layerif-"):
                    allocation = allocate_experts("layerif", n_layers, budget, scores.scores(method.split("-")[1]),
                                                  beta=args.beta)
                elif method == "reversed":
                    allocation = allocate_experts("reversed", n_layers, budget, scores.scores("S_pos"), beta=args.beta)
                elif method == "alphalora":
                    allocation = allocate_experts("alphalora", n_layers, budget, alphas=alphas, beta=args.beta)
                elif method == "plain-lora":
                    allocation = ExpertAllocation("plain-lora", [1] * n_layers, [1] * n_layers)
                    moe_options = {"rank": lora_rank, "alpha": 2.0 * lora_rank}
                else:
                    allocation = allocate_experts(method, n_layers, budget)
                log = train_adapter(loaded_copy, train_rows, allocation, work / "runs" / task / method,
                                    moe_options, train_config, model_name="smollm2-135m", quiet=True)
                record.update(counts=allocation.counts, params=log["trainable_parameters"], steps=log["steps"],
                              final_loss=log["final_loss"], train_s=log["seconds"])
                allocations[(task, method)] = allocation.counts
            started = time.perf_counter()
            result = loglik_accuracy(model, tokenizer, test_rows, batch_size=16, quiet=True)
            record.update(accuracy=result.accuracy, stderr=result.stderr, eval_s=time.perf_counter() - started)
            atomic_write_json(result_path, record)
            records.append(record)
            print(f"{task:14s} {method:16s} acc {result.accuracy:.3f} ± {result.stderr:.3f}  "
                  f"train {record.get('train_s', 0):.0f}s eval {record['eval_s']:.0f}s", flush=True)
            del model, loaded_copy

    total = time.perf_counter() - started_all
    write_results(Path(args.results), name, records, allocations, tasks, methods, size, scoring_seconds, total,
                  budget, n_layers, lora_rank, args)
    return 0


def write_results(results: Path, name: str, records, allocations, tasks, methods, size, scoring_seconds, total,
                  budget, n_layers, lora_rank, args) -> None:
    """CSV of every run, a markdown table (accuracy ± s.e.), and the allocation heatmap."""
    from layerif.io import atomic_write_text

    columns = ["task", "method", "accuracy", "stderr", "n_test", "n_train", "epochs", "steps", "params",
               "final_loss", "train_s", "eval_s", "counts"]
    lines = [",".join(columns)]
    for record in records:
        values = []
        for column in columns:
            value = record.get(column, "")
            if column == "counts" and value:
                value = " ".join(map(str, value))
            values.append(f"{value:.6g}" if isinstance(value, float) else str(value))
        lines.append(",".join(values))
    atomic_write_text(results / f"{name}.csv", "\n".join(lines) + "\n")

    table = {(r["task"], r["method"]): r for r in records}
    order = ["base", *methods]
    header = "| method | " + " | ".join(tasks) + " | mean | params |"
    rows = [header, "|" + "---|" * (len(tasks) + 3)]
    means = {}
    for method in order:
        cells, accs, ses = [], [], []
        for task in tasks:
            record = table.get((task, method))
            if record is None:
                cells.append("–")
                continue
            cells.append(f"{100 * record['accuracy']:.1f} ± {100 * record['stderr']:.1f}")
            accs.append(record["accuracy"])
            ses.append(record["stderr"])
        if accs:
            mean = float(np.mean(accs))
            mean_se = math.sqrt(sum(s * s for s in ses)) / len(ses)
            means[method] = mean
            mean_cell = f"**{100 * mean:.1f}** ± {100 * mean_se:.1f}"
        else:
            mean_cell = "–"
        params = next((r.get("params") for r in records if r["method"] == method and r.get("params")), None)
        rows.append(f"| {method} | " + " | ".join(cells) + f" | {mean_cell} | {params or '–'} |")
    paired = paired_differences(table, tasks, methods)
    text = [
        f"# LoRA-MoE benchmark ({'quick' if name == 'moe' else name})",
        "",
        f"Generated by `python bench/moe.py {' '.join(sys.argv[1:])}`. SmolLM2-135M-Instruct (fp32, "
        f"{n_layers} blocks), LoRA-MoE on every attention and MLP projection, rank 8, alpha 16, dropout 0.05, "
        f"top-k = min(2, n_l), budget T = {budget} experts ({budget // n_layers} per layer on average), "
        f"beta = {args.beta}. Training: first {size['n_train'] or 'all'} train rows, {size['epochs']:g} epoch(s), "
        f"AdamW lr {args.lr:g}, batch {args.batch_size} (micro {args.micro_batch_size or 'auto'}), warm-up min(100, 10 %), "
        f"loss on the whole text, seed {args.seed}. "
        f"Evaluation: label log-likelihood on the first {size['n_test'] or 'all'} test rows; accuracy in % ± "
        f"binomial standard error. LayerIF scores: DataInf over all block weights, first {size['score_train']} "
        f"train x {size['score_val']} validation rows of each task (the paper: 300 x 50). plain-lora: one LoRA per projection of rank {lora_rank} "
        f"(alpha {2 * lora_rank}), about the uniform MoE's parameter count. base: no adapter.",
        "",
        *rows,
        "",
        "Paired comparison (same test rows): mean over tasks of LayerIF minus the baseline, in points.",
        "",
        *paired,
        "",
        "Compute time (s, one CPU thread per process, on a shared machine): scoring "
        + ", ".join(f"{t} {s:.0f}" for t, s in scoring_seconds.items())
        + f"; training {sum(r.get('train_s', 0) for r in records):.0f}; evaluation "
        f"{sum(r.get('eval_s', 0) for r in records):.0f}; in all "
        f"{(sum(scoring_seconds.values()) + sum(r.get('train_s', 0) + r.get('eval_s', 0) for r in records)) / 60:.0f}"
        " min.",
        "",
        "Allocations: `moe.png` (rows = method / task, columns = layers); counts are in the CSV.",
    ]
    notes_marker = "<!-- notes: kept when the tables are regenerated -->"
    previous = results / f"{name}.md"
    notes = ""
    if previous.is_file() and notes_marker in previous.read_text():
        notes = previous.read_text().split(notes_marker, 1)[1]
    atomic_write_text(previous, "\n".join(text) + "\n\n" + notes_marker + (notes or "\n"))
    heatmap(results / f"{name}.png", allocations, tasks, methods)


def paired_differences(table, tasks, methods) -> list[str]:
    """Lines: for each LayerIF variant and baseline, the per-task and mean accuracy differences."""
    lines = ["| LayerIF variant | vs | " + " | ".join(tasks) + " | mean |", "|" + "---|" * (len(tasks) + 3)]
    for ours in [m for m in methods if m.startswith("layerif")]:
        for other in [m for m in ["base", *methods] if not m.startswith("layerif")]:
            diffs = []
            for task in tasks:
                a, b = table.get((task, ours)), table.get((task, other))
                diffs.append(None if a is None or b is None else 100 * (a["accuracy"] - b["accuracy"]))
            known = [d for d in diffs if d is not None]
            cells = ["–" if d is None else f"{d:+.1f}" for d in diffs]
            mean = f"{np.mean(known):+.2f}" if known else "–"
            lines.append(f"| {ours} | {other} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def heatmap(path: Path, allocations, tasks, methods) -> None:
    """Expert counts per layer: one row per (method, task), like the paper's Figure 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerif.io import atomic_savefig

    labels, matrix = [], []
    for method in methods:
        if method == "plain-lora":
            continue
        for task in tasks:
            counts = allocations.get((task, method))
            if counts is None:
                continue
            if method in ("uniform", "mola-2468", "mola-8642", "alphalora") and labels and \
                    any(label.startswith(method) for label in labels):
                continue  # data-independent: one row is enough
            labels.append(method if method in ("uniform", "mola-2468", "mola-8642", "alphalora")
                          else f"{method} / {task}")
            matrix.append(counts)
    if not matrix:
        return
    matrix = np.asarray(matrix)
    figure, axis = plt.subplots(figsize=(0.32 * matrix.shape[1] + 3, 0.32 * len(labels) + 1.2))
    image = axis.imshow(matrix, aspect="auto", cmap="viridis")
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.set_xticks(range(matrix.shape[1]), range(matrix.shape[1]), fontsize=7)
    axis.set_xlabel("layer")
    for (i, j), value in np.ndenumerate(matrix):
        axis.text(j, i, str(value), ha="center", va="center", fontsize=6,
                  color="white" if value < matrix.max() * 0.6 else "black")
    figure.colorbar(image, ax=axis, label="experts")
    axis.set_title("LoRA experts per layer")
    atomic_savefig(path, figure)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
