"""Report of the quick pruning benchmark (`python bench/pruning.py --quick`): table, verdict lines, figure."""

from __future__ import annotations

import math
from pathlib import Path

import torch

SCORE_TASKS = ("boolq", "arc_easy", "arc_challenge", "openbookqa")
EVAL_TASKS = ("boolq", "rte", "arc_easy", "arc_challenge", "openbookqa")
ALLOCATIONS = ("uniform", "owl", "alphapruning", "layerif", "reversed")
USES_EPSILON = ("alphapruning", "layerif", "reversed")


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


def write_report(results: Path, rows: list[dict], dense: dict, preset_name: str, preset: dict, command: str, profile,
                 alpha, outlier, wall_s: float, tag: str, score_seconds: dict[str, float]) -> None:
    """bench/results/pruning{tag}.md and .png of the quick benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerif.io import atomic_savefig, atomic_write_text

    shown = preset.get("eval_tasks", EVAL_TASKS)
    lines = [f"# Pruning benchmark — SmolLM2-135M ({preset_name} size)", "",
             f"Command: `{command}` (torch threads: {torch.get_num_threads()}; wall time {wall_s / 60:.1f} min "
             f"for this invocation; LayerIF scoring {sum(score_seconds.values()) / 60:.1f} min "
             f"({', '.join(f'{t} {v:.0f} s' for t, v in score_seconds.items())}); on a 2-core machine shared with "
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
    atomic_write_text(results / f"pruning{tag}.md", "\n".join(lines) + "\n")

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
    atomic_savefig(results / f"pruning{tag}.png", figure)
    plt.close(figure)
