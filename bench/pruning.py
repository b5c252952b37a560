"""Pruning benchmark: LayerIF sparsity budgets against uniform, OWL, AlphaPruning and reversed LayerIF.

SmolLM2-135M (the built-in GGUF, dequantised to float32). LayerIF scores (S_pos, DataInf, all block matrices)
come from `layerif.score_layers` on the train split of each zero-shot task (first n_train rows as train, the
next n_val rows as validation); each task's scores are |.|-min-max normalised and averaged into one profile, so
one pruned model per configuration is evaluated on every task. Each configuration starts from the dense
weights, prunes with magnitude / Wanda / SparseGPT (calibration: random windows of WikiText-2 valid, seed 0),
and reports WikiText-2 test perplexity and zero-shot accuracy (lm-eval protocol) with standard errors.

    python bench/pruning.py --quick     # the committed small table (under 30 min on 2 idle cores)
    python bench/pruning.py --standard  # the study: `layerif compare prune` over 3 settings x 3 seeds (hours)

`--quick` writes bench/results/pruning.md, .csv and .png (rows appended to the CSV as they finish; --resume
skips configurations already in it). `--standard` is bench/pruning_standard.py: it writes pruning_full.*.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pruning_report import ALLOCATIONS, EVAL_TASKS, SCORE_TASKS, USES_EPSILON, fmt_acc, write_report

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
RUNS = REPO / "runs" / "bench-pruning"

PRESETS = {
    # 0.5: the three pruners with uniform ratios (sanity); 0.7: every allocation with Wanda, ε 0.3 and 0.1
    "quick": dict(n_train=16, n_val=4, calib_sequences=32, calib_length=256, ppl_windows=16, ppl_length=512,
                  limit=20, eval_tasks=("rte", "arc_easy", "arc_challenge", "openbookqa"), sparsities=(0.7,),
                  epsilons=(0.3,), sweep_epsilons=(0.1,), methods=("magnitude", "wanda", "sparsegpt"),
                  full_grid_methods=("wanda",), baseline_sparsities=(),
                  extra=((0.5, "magnitude", "uniform", None), (0.5, "wanda", "uniform", None),
                         (0.5, "sparsegpt", "uniform", None))),
}
SCORE_SECONDS: dict[str, float] = {}  # wall time of each task's scoring (recorded when it was computed)
FIELDS = ["sparsity", "method", "allocation", "epsilon", "ppl", "mean_acc", "mean_acc_stderr",
          *[f"acc_{t}" for t in EVAL_TASKS], *[f"stderr_{t}" for t in EVAL_TASKS], "measured_sparsity",
          "max_ratio", "min_ratio", "clipped_blocks", "prune_s", "eval_s"]


@dataclass(frozen=True)
class Config:
    sparsity: float
    method: str
    allocation: str
    epsilon: float | None

    @property
    def key(self) -> tuple:
        return (f"{self.sparsity:.2f}", self.method, self.allocation, "" if self.epsilon is None else f"{self.epsilon:.2f}")


def grid(preset: dict) -> list[Config]:
    """Every (sparsity, method, allocation, ε) of a preset; the quick one keeps baselines-only rows small."""
    configs = []
    for sparsity in preset["sparsities"]:
        for method in preset["methods"]:
            full = method in preset["full_grid_methods"]
            if not full and sparsity not in preset["baseline_sparsities"]:
                continue
            allocations = ALLOCATIONS if full else ("uniform",)
            for allocation in allocations:
                epsilons = preset["epsilons"] if allocation in USES_EPSILON else (None,)
                configs += [Config(sparsity, method, allocation, eps) for eps in epsilons]
            if method in preset["full_grid_methods"] and sparsity == max(preset["sparsities"]):
                configs += [Config(sparsity, method, allocation, eps) for eps in preset["sweep_epsilons"]
                            for allocation in ("layerif", "reversed")]
    return [Config(*extra) for extra in preset.get("extra", ())] + configs


def task_scores(model, tokenizer, preset: dict, resume: bool) -> dict[str, np.ndarray]:
    """S_pos per block for each score task (saved under runs/; reused with --resume)."""
    from layerif import LayerScores, ScoreConfig, score_layers
    from layerif.data import load_rows

    result = {}
    for task in SCORE_TASKS:
        folder = RUNS / f"scores-{task}-{preset['n_train']}x{preset['n_val']}"
        if resume and (folder / "influence.safetensors").is_file():
            scores = LayerScores.load(folder)
        else:
            started = time.perf_counter()
            rows = load_rows(DATA / "zeroshot" / task / "train.jsonl")
            train = rows[: preset["n_train"]]
            val = rows[preset["n_train"] : preset["n_train"] + preset["n_val"]]
            config = ScoreConfig(n_train=len(train), n_val=len(val), quiet=True)
            scores = score_layers(model, tokenizer, train, val, config)
            scores.save(folder)
            (folder / "bench_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
            print(f"scores {task}: {time.perf_counter() - started:.0f} s", flush=True)
        result[task] = scores.scores("S_pos")
        SCORE_SECONDS[task] = json.loads((folder / "bench_seconds.json").read_text())["seconds"]
    return result


def alpha_blocks(model) -> list:
    from layerif.models import find_blocks

    return list(find_blocks(model)[1])


def combined_profile(per_task: dict[str, np.ndarray]) -> np.ndarray:
    """Mean over tasks of min-max normalised |S_pos| (each task weighs the same)."""
    from layerif.scores import minmax

    return np.mean([minmax(np.abs(values)) for values in per_task.values()], axis=0)


def evaluate(model, tokenizer, preset: dict) -> dict:
    from layerif.evaluate.perplexity import perplexity
    from layerif.evaluate.zeroshot import zeroshot_accuracy

    ppl = perplexity(model, tokenizer, DATA / "text" / "wikitext2" / "test.txt", preset["ppl_length"],
                     preset["ppl_windows"], batch_size=4, quiet=True)
    if not preset["limit"]:  # perplexity only
        return {"ppl": ppl["perplexity"], "mean_acc": math.nan, "mean_acc_stderr": math.nan,
                **{f"{kind}_{task}": math.nan for kind in ("acc", "stderr") for task in EVAL_TASKS}}
    tasks = preset.get("eval_tasks", EVAL_TASKS)
    zero = zeroshot_accuracy(model, tokenizer, tasks, DATA, preset["limit"], batch_size=16, quiet=True)
    row = {"ppl": ppl["perplexity"], "mean_acc": zero["mean_acc"], "mean_acc_stderr": zero["mean_acc_stderr"]}
    for task in EVAL_TASKS:
        row[f"acc_{task}"] = zero["tasks"][task]["acc"] if task in tasks else math.nan
        row[f"stderr_{task}"] = zero["tasks"][task]["acc_stderr"] if task in tasks else math.nan
    return row


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict]) -> None:
    import io

    from layerif.io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def row_key(row: dict) -> tuple:
    eps = row["epsilon"]
    return (f"{float(row['sparsity']):.2f}", row["method"], row["allocation"], "" if eps == "" else f"{float(eps):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="The small preset (the committed results; the default).")
    parser.add_argument("--resume", action="store_true", help="Skip configurations already in the CSV.")
    parser.add_argument("--tag", default="", help="Suffix of the result files.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--standard", action="store_true",
                        help="The study over `layerif compare prune`: 3 settings x 3 calibration seeds (hours; resumable).")
    parser.add_argument("--settings", help="--standard: only these pruner-sparsity settings, e.g. wanda-70,wanda-60.")
    parser.add_argument("--no-variants", action="store_true", help="--standard: skip the LayerIF variants.")
    parser.add_argument("--report-only", action="store_true", help="--standard: only rewrite the tables.")
    parser.add_argument("--smoke", action="store_true", help="--standard at tiny sizes (checks the code).")
    parser.add_argument("--model", default="smollm2-135m", help="--standard --smoke: another (tiny) model folder.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (DATA / "zeroshot").is_dir():
        sys.exit(f"benchmark data not found at {DATA}")
    if args.standard:
        import pruning_standard

        pruning_standard.main(args.settings, not args.no_variants, args.report_only, args.smoke, args.model)
        return
    preset_name, preset = "quick", PRESETS["quick"]
    tag = args.tag
    command = "python bench/pruning.py --quick" + (f" --tag {args.tag}" if args.tag else "")

    from layerif.allocate.metrics import block_alpha_hill, owl_outlier_ratios
    from layerif.allocate.sparsity import allocate_sparsity
    from layerif.calibration import calibration_ids
    from layerif.models import load_model
    from layerif.prune import prune_model

    started = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m", dtype="float32", quiet=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    dense_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    csv_path = RESULTS / f"pruning{tag}.csv"
    rows = read_rows(csv_path) if args.resume else []
    done = {row_key(r) for r in rows}

    needs_scores = any(c.allocation in ("layerif", "reversed") for c in grid(preset))
    n_blocks = len(alpha_blocks(model))
    profile = (combined_profile(task_scores(model, tokenizer, preset, args.resume)) if needs_scores
               else np.full(n_blocks, math.nan))
    model.load_state_dict(dense_state)
    calib = calibration_ids(DATA / "text" / "wikitext2" / "valid.txt", tokenizer, preset["calib_sequences"],
                            preset["calib_length"], seed=0)
    alpha = block_alpha_hill(model)
    outlier = owl_outlier_ratios(model, calib)
    dense_path = RUNS / f"dense{tag}.json"
    if args.resume and dense_path.is_file():
        dense = json.loads(dense_path.read_text())
    else:
        dense = evaluate(model, tokenizer, preset)
        dense_path.parent.mkdir(parents=True, exist_ok=True)
        dense_path.write_text(json.dumps(dense))
    print(f"dense: ppl {dense['ppl']:.2f}, acc {fmt_acc(dense)}", flush=True)

    for config in grid(preset):
        if config.key in done:
            continue
        model.load_state_dict(dense_state)
        t0 = time.perf_counter()
        plan = allocate_sparsity(model, config.allocation, config.sparsity, scores=profile,
                                 epsilon=config.epsilon if config.epsilon is not None else 0.3,
                                 alpha=alpha, outlier=outlier, calib_ids=calib)
        report = prune_model(model, plan.matrix_ratios, config.method, calib, quiet=True)
        t1 = time.perf_counter()
        row = evaluate(model, tokenizer, preset)
        row.update(sparsity=config.sparsity, method=config.method, allocation=config.allocation,
                   epsilon="" if config.epsilon is None else config.epsilon, measured_sparsity=report.overall,
                   max_ratio=float(plan.block_ratios.max()), min_ratio=float(plan.block_ratios.min()),
                   clipped_blocks=" ".join(map(str, plan.clipped)), prune_s=t1 - t0,
                   eval_s=time.perf_counter() - t1)
        rows.append(row)
        write_rows(csv_path, rows)
        print(f"{config}: ppl {row['ppl']:.2f} acc {fmt_acc(row)} ({t1 - t0:.0f} s + {row['eval_s']:.0f} s)",
              flush=True)

    order = {key: i for i, key in enumerate(c.key for c in grid(preset))}
    rows = read_rows(csv_path)  # as strings, the same whether resumed or not
    rows = sorted((r for r in rows if row_key(r) in order), key=lambda r: order[row_key(r)])
    write_rows(csv_path, rows)
    write_report(RESULTS, rows, dense, preset_name, preset, command, profile, alpha, outlier,
                 time.perf_counter() - started, tag, SCORE_SECONDS)
    print(f"wrote {RESULTS / f'pruning{tag}.md'}")


if __name__ == "__main__":
    main()
