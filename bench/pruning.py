"""Pruning benchmark: LayerIF sparsity budgets against uniform, OWL, AlphaPruning and reversed LayerIF.

SmolLM2-135M (the built-in GGUF, dequantised to float32). LayerIF scores (S_pos, DataInf, all block matrices)
come from `layerif.score_layers` on the train split of each zero-shot task (first n_train rows as train, the
next n_val rows as validation); each task's scores are |.|-min-max normalised and averaged into one profile, so
one pruned model per configuration is evaluated on every task. Each configuration starts from the dense
weights, prunes with magnitude / Wanda / SparseGPT (calibration: random windows of WikiText-2 valid, seed 0),
and reports WikiText-2 test perplexity and zero-shot accuracy (lm-eval protocol) with standard errors.

    python bench/pruning.py --quick     # the committed results (under 30 min on 2 idle cores)
    python bench/pruning.py             # full size: 300 x 50 scores per task, 128 x 512 calibration, ...
    python bench/pruning.py --standard  # the study with controls and statistics (bench/pruning_standard.py)

Writes bench/results/pruning{tag}.md, .csv and .png. Rows are appended to the CSV as they finish; --resume
skips configurations already in it (and reuses saved scores under runs/bench-pruning/).
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

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
RUNS = REPO / "runs" / "bench-pruning"
SCORE_TASKS = ("boolq", "arc_easy", "arc_challenge", "openbookqa")
EVAL_TASKS = ("boolq", "rte", "arc_easy", "arc_challenge", "openbookqa")
ALLOCATIONS = ("uniform", "owl", "alphapruning", "layerif", "reversed")
USES_EPSILON = ("alphapruning", "layerif", "reversed")

PRESETS = {
    # 0.5: the three pruners with uniform ratios (sanity); 0.7: every allocation with Wanda, ε 0.3 and 0.1
    "quick": dict(n_train=16, n_val=4, calib_sequences=32, calib_length=256, ppl_windows=16, ppl_length=512,
                  limit=20, eval_tasks=("rte", "arc_easy", "arc_challenge", "openbookqa"), sparsities=(0.7,),
                  epsilons=(0.3,), sweep_epsilons=(0.1,), methods=("magnitude", "wanda", "sparsegpt"),
                  full_grid_methods=("wanda",), baseline_sparsities=(),
                  extra=((0.5, "magnitude", "uniform", None), (0.5, "wanda", "uniform", None),
                         (0.5, "sparsegpt", "uniform", None))),
    "full": dict(n_train=300, n_val=50, calib_sequences=128, calib_length=512, ppl_windows=200, ppl_length=512,
                 limit=500, sparsities=(0.5, 0.6, 0.7), epsilons=(0.1, 0.3), sweep_epsilons=(),
                 methods=("magnitude", "wanda", "sparsegpt"), full_grid_methods=("magnitude", "wanda", "sparsegpt"),
                 baseline_sparsities=(0.5, 0.6, 0.7)),
    # DESIGN §5 reference setting (128 x 512 calibration), perplexity only, the configurations it quotes
    "reference": dict(n_train=16, n_val=4, calib_sequences=128, calib_length=512, ppl_windows=200, ppl_length=512,
                      limit=0, sparsities=(0.5, 0.7), epsilons=(0.3,), sweep_epsilons=(),
                      methods=("magnitude", "wanda", "sparsegpt"), full_grid_methods=(),
                      baseline_sparsities=(0.5, 0.7), extra=((0.7, "wanda", "alphapruning", 0.3),
                                                             (0.7, "wanda", "owl", None))),
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


def fmt_acc(row: dict) -> str:
    if math.isnan(float(row["mean_acc"])):
        return "—"
    return f"{100 * float(row['mean_acc']):.2f} ± {100 * float(row['mean_acc_stderr']):.2f}"


def verdict(rows: list[dict], sparsity: float) -> list[str]:
    """Sentences comparing LayerIF with each baseline at `sparsity` (per method and ε), on ppl and accuracy."""
    lines = []
    at = [r for r in rows if r["sparsity"] != "" and abs(float(r["sparsity"]) - sparsity) < 1e-9]
    for method in sorted({r["method"] for r in at}):
        mine = [r for r in at if r["method"] == method and r["allocation"] == "layerif"]
        for ours in mine:
            eps = ours["epsilon"]
            parts = []
            for base in ("uniform", "owl", "alphapruning", "reversed"):
                candidates = [r for r in at if r["method"] == method and r["allocation"] == base and
                              (base not in USES_EPSILON or r["epsilon"] == eps)]
                if not candidates:
                    continue
                other = candidates[0]
                p_ours, p_other = float(ours["ppl"]), float(other["ppl"])
                a_ours, a_other = float(ours["mean_acc"]), float(other["mean_acc"])
                se = math.hypot(float(ours["mean_acc_stderr"]), float(other["mean_acc_stderr"]))
                acc_word = ("higher" if a_ours > a_other else "lower") if abs(a_ours - a_other) > 2 * se else "within 2 s.e. of"
                parts.append(f"vs {base}{f' (ε {float(eps):g})' if base in USES_EPSILON else ''}: perplexity "
                             f"{p_ours:.1f} vs {p_other:.1f} ({'better' if p_ours < p_other else 'worse'}), mean accuracy "
                             f"{100 * a_ours:.2f} vs {100 * a_other:.2f} ({acc_word})")
            lines.append(f"- {method}, LayerIF ε {float(eps):g}: " + "; ".join(parts))
    return lines


def write_report(rows: list[dict], dense: dict, preset_name: str, preset: dict, command: str, profile, alpha,
                 outlier, wall_s: float, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerif.io import atomic_savefig, atomic_write_text

    shown = preset.get("eval_tasks", EVAL_TASKS)
    lines = [f"# Pruning benchmark — SmolLM2-135M ({preset_name} size)", "",
             f"Command: `{command}` (torch threads: {torch.get_num_threads()}; wall time {wall_s / 60:.1f} min "
             f"for this invocation; LayerIF scoring {sum(SCORE_SECONDS.values()) / 60:.1f} min "
             f"({', '.join(f'{t} {v:.0f} s' for t, v in SCORE_SECONDS.items())}); on a 2-core machine shared with "
             "other jobs, so times are upper bounds).", "",
             "Setup: built-in SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32). "
             f"LayerIF scores: S_pos (DataInf, all block matrices) from {preset['n_train']} train × {preset['n_val']} "
             f"validation rows of the train split of each of {', '.join(SCORE_TASKS)}; per-task |S| min-max "
             "normalised and averaged; then the DESIGN §5 map (Savitzky–Golay 7/3, linear map with ε, clip 0.99, "
             f"re-balance). Calibration: {preset['calib_sequences']} random windows of {preset['calib_length']} "
             f"tokens of WikiText-2 valid (seed 0). Perplexity: first {preset['ppl_windows']} non-overlapping "
             f"{preset['ppl_length']}-token windows of WikiText-2 test. Zero-shot: lm-eval log-likelihood, first "
             f"{preset['limit']} rows of each of {', '.join(shown)}; accuracy in %, ± one standard error "
             "(mean over tasks: s.e. of the mean of independent task accuracies).", "",
             f"Dense: perplexity **{dense['ppl']:.2f}**, mean accuracy {fmt_acc(dense)}.", "",
             "| sparsity | method | allocation | ε | WikiText-2 ppl | mean acc (%) | "
             + " | ".join(shown) + " | ratios min–max | clipped |",
             "|---|---|---|---|---|---|" + "---|" * len(shown) + "---|---|"]
    for row in rows:
        eps = "" if row["epsilon"] == "" else f"{float(row['epsilon']):g}"
        tasks = " | ".join("—" if math.isnan(float(row[f"acc_{t}"])) else f"{100 * float(row[f'acc_{t}']):.1f}"
                           for t in shown)
        lines.append(f"| {float(row['sparsity']):g} | {row['method']} | {row['allocation']} | {eps} | "
                     f"{float(row['ppl']):.1f} | {fmt_acc(row)} | {tasks} | "
                     f"{float(row['min_ratio']):.3f}–{float(row['max_ratio']):.3f} | {row['clipped_blocks'] or '—'} |")
    top = max(float(r["sparsity"]) for r in rows)
    verdict_lines = verdict(rows, top)
    if verdict_lines:
        lines += ["", f"## LayerIF against each baseline at {top:g} sparsity", "", *verdict_lines]
    lines += ["", "## Per-block inputs of the allocations", "",
              "| block | LayerIF profile (mean normalised S_pos) | PL_Alpha_Hill | OWL outlier ratio (%) |",
              "|---|---|---|---|"]
    lines += [f"| {i} | {profile[i]:.3f} | {alpha[i]:.3f} | {100 * outlier[i]:.3f} |" for i in range(len(profile))]
    atomic_write_text(RESULTS / f"pruning{tag}.md", "\n".join(lines) + "\n")

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    wanda = [r for r in rows if r["method"] == "wanda"]
    for allocation in ALLOCATIONS:
        for eps in sorted({r["epsilon"] for r in wanda if r["allocation"] == allocation}):
            series = sorted((float(r["sparsity"]), float(r["ppl"]), float(r["mean_acc"]))
                            for r in wanda if r["allocation"] == allocation and r["epsilon"] == eps)
            label = allocation + (f" ε {float(eps):g}" if eps else "")
            xs = [s[0] for s in series]
            axes[0].plot(xs, [s[1] for s in series], marker="o", label=label)
            axes[1].plot(xs, [100 * s[2] for s in series], marker="o", label=label)
    axes[0].set_yscale("log")
    axes[0].set_title("Wanda: WikiText-2 perplexity")
    axes[1].set_title("Wanda: mean zero-shot accuracy (%)")
    axes[1].axhline(100 * dense["mean_acc"], color="grey", linestyle="--", label="dense")
    for axis in axes:
        axis.set_xlabel("sparsity")
    axes[1].legend(fontsize=8)
    atomic_savefig(RESULTS / f"pruning{tag}.png", figure)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="The small preset (the committed results).")
    parser.add_argument("--reference", action="store_true",
                        help="Perplexity only, DESIGN §5 reference setting (128 x 512 calibration, 200 windows).")
    parser.add_argument("--resume", action="store_true", help="Skip configurations already in the CSV.")
    parser.add_argument("--tag", default="", help="Suffix of the result files.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--standard", action="store_true",
                        help="The standard study (controls, ε on validation, seeds, paired statistics; hours).")
    parser.add_argument("--settings", help="--standard: only these pruner-sparsity settings, e.g. wanda-70,wanda-60.")
    parser.add_argument("--full", action="store_true",
                        help="--standard: the whole grid (3 settings x 3 seeds, every baseline, variants; ≈ 30 h).")
    parser.add_argument("--no-variants", action="store_true", help="--standard: skip the LayerIF variants.")
    parser.add_argument("--report-only", action="store_true", help="--standard: only rewrite the tables.")
    parser.add_argument("--smoke", action="store_true", help="--standard at tiny sizes (checks the code).")
    parser.add_argument("--model", default="smollm2-135m", help="--standard --smoke: another (tiny) model folder.")
    parser.add_argument("--plan", action="store_true", help="--standard: list the units left, with projected time.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (DATA / "zeroshot").is_dir():
        sys.exit(f"benchmark data not found at {DATA}")
    if args.standard:
        import pruning_standard

        pruning_standard.main(args.threads, args.settings, not args.no_variants, args.report_only, args.smoke,
                              args.model, args.plan, args.full)
        return
    preset_name = "reference" if args.reference else "quick" if args.quick else "full"
    preset = PRESETS[preset_name]
    tag = args.tag or {"quick": "", "full": "_full", "reference": "_reference"}[preset_name]
    command = ("python bench/pruning.py" + {"quick": " --quick", "full": "", "reference": " --reference"}[preset_name]
               + (f" --tag {args.tag}" if args.tag else ""))

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
    write_report(rows, dense, preset_name, preset, command, profile, alpha, outlier,
                 time.perf_counter() - started, tag)
    print(f"wrote {RESULTS / f'pruning{tag}.md'}")


if __name__ == "__main__":
    main()
