"""The `standard` LoRA-MoE study (`python bench/moe.py --standard`): can allocations differ, and where is LayerIF?

SmolLM2-135M (built-in GGUF, float32), LoRA-MoE on every projection (rank 8, alpha 16, dropout 0.05), top-k =
min(2, n_l), T = 150 experts (5 per layer on average), β 2.5, AdamW lr 3e-4, batches of 8 rows (micro-batch from
the memory budget), loss on the answer tokens only (`--output-only`).

- Validation curve per task: the uniform MoE (seed 0) trained for 120 steps, validation accuracy (label
  log-likelihood, first 200 validation rows) every 30 steps, and the base model's. A task is kept
  only when the uniform MoE's best validation accuracy is better than the base model's by the paired
  bootstrap's 95 % interval (otherwise allocations cannot differ there); the report says why a task was left
  out. The steps for every allocation of that task: the first checkpoint within one standard error of the
  curve's best (where validation accuracy has stopped rising), chosen on validation only.
- Allocations at T = 150: LayerIF S_pos and S_top25 (scores at 300 x 50 on the task's own train / validation
  rows), depth, random (the S_pos counts permuted with the training seed), uniform, MoLA-8642, MoLA-2468,
  AlphaLoRA, reversed; a plain LoRA of about the same trainable parameters as a reference point.
- Seeds 0, 1, 2 per configuration; test = first 500 test rows (all if fewer), per-row correctness kept;
  paired bootstrap (10,000 resamples) over test rows with seeds averaged inside a resample, LayerIF S_pos
  minus each alternative, per task and averaged over the kept tasks.

Sizing, measured on 2 idle cores (uniform MoE, 3 steps of 16 rows and 48 validation rows per task, one run):
seconds per training step of 16 rows / per evaluated row — cola 7.7 / 0.17 (30 tokens a row), openbookqa
13.5 / 0.29 (51), commonsenseqa 14.4 / 0.32 (52), mrpc 20.7 / 0.37 (82), rte 25.8 / 0.52 (99). Tasks run in
that order, cheapest first. Batches are 8 rows (half the paper's 16): B starts at zero, so how far the adapters
leave the base model grows with the number of Adam updates, and on a CPU 8-row steps give twice the updates for
the same compute. Measured in the committed run: curves of 120 steps with 5 validation points and the final
test evaluation 528 s (cola) to 1,322 s (mrpc), a 60-step mrpc run ≈ 560 s, mrpc scoring at 300 x 50 435 s.
The grid on three kept tasks (10 configurations x 3 seeds each) is ≈ 15-20 h here; 3 h hold the screen of
four tasks and LayerIF, depth, random and uniform at one or two seeds on one task. Units therefore run in priority order — per task: curve, base model, seed 0 then seed 1 of LayerIF
S_pos, depth, random, uniform, and the plain LoRA; after every task: seed 2 and the other allocations — each
saved under runs/bench-moe-standard/, so stopping at any point leaves complete tables for what finished and a
rerun continues. The curve's run is the uniform MoE's seed-0 run when the chosen steps are the curve's last
(same seed, steps and schedule), and is evaluated on the test rows at its end for that case. `--plan` lists the
units left with projected time.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from study import PlannedUnits, Units, acc_text, describe_state, machine_state, wall_hours, write_tables

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "moe"
RESULTS = REPO / "bench" / "results"
WORK = REPO / "runs" / "bench-moe-standard"
REPORT = "moe_standard"
TASKS = ("openbookqa", "cola", "commonsenseqa", "mrpc", "rte")  # cheapest first; scienceqa: 300 train rows only
CORE = ("layerif-S_pos", "depth", "random", "uniform")  # the question: LayerIF against its controls
METHODS = (*CORE, "plain-lora", "layerif-S_top25", "mola-8642", "mola-2468", "alphalora", "reversed")
SEEDS = (0, 1, 2)
BUDGET, BETA, BATCH, LR = 150, 2.5, 8, 3e-4
MAX_STEPS, EVAL_EVERY, N_VAL, N_TEST = 120, 30, 200, 500  # the docstring (and so the report) quotes these
SCORE_TRAIN, SCORE_VAL = 300, 50
ESTIMATES = {"scores": 450, "curve": 1000, "run": 600, "base": 110}  # measured means (mrpc runs; rte ≈ 1.6x)
KEEP_ALL = False  # smoke only: keep every task whatever its curve, to exercise the run units


class MoEStudy:
    """Base model and per-task inputs shared by every unit, loaded lazily."""

    def __init__(self, units: Units, model_name: str = "smollm2-135m"):
        self.units = units
        self.model_name = model_name
        self._loaded = None
        self._alphas = None

    def loaded(self):
        if self._loaded is None:
            from layerif.models import load_model

            self._loaded = load_model(self.model_name, dtype="float32", quiet=True)
        return self._loaded

    def fresh(self):
        """A copy of the loaded base model (training injects adapters in place)."""
        loaded = copy.copy(self.loaded())
        loaded.model = copy.deepcopy(self.loaded().model)
        return loaded

    def rows(self, task: str, split: str) -> list[dict]:
        from layerif.data import load_rows

        return load_rows(DATA / task / f"{split}.jsonl")

    def accuracy_rows(self, model, rows: list[dict]) -> list[int]:
        from layerif.evaluate.labels import loglik_accuracy

        result = loglik_accuracy(model, self.loaded().tokenizer, rows, batch_size=16, quiet=True)
        return [int(p == str(row["answer"])) for p, row in zip(result.predictions, rows, strict=True)]

    def scores(self, task: str):
        from layerif.scores import LayerScores

        folder = self.units.folder / f"scores-{task}"

        def compute() -> dict:
            from layerif import ScoreConfig, score_layers

            loaded = self.loaded()
            result = score_layers(loaded.model, loaded.tokenizer, self.rows(task, "train"),
                                  self.rows(task, "validation"), ScoreConfig(n_train=SCORE_TRAIN, n_val=SCORE_VAL,
                                                                            quiet=True))
            result.save(folder)
            return {"folder": str(folder)}

        self.units.run(f"scores-{task}", compute)
        return LayerScores.load(folder)

    def allocation(self, task: str, method: str, seed: int):
        """(ExpertAllocation, extra MoE options) of a method at T = BUDGET."""
        from layerif.allocate.experts import ExpertAllocation, allocate_experts, model_alphas
        from layerif.models import find_blocks

        n_layers = len(find_blocks(self.loaded().model)[1])
        if method == "plain-lora":
            from layerif.moe import MoEConfig, expected_parameters

            reference = expected_parameters(self.loaded().model,
                                            MoEConfig(counts=allocate_experts("uniform", n_layers, BUDGET).counts))
            from moe import plain_lora_rank

            rank = plain_lora_rank(self.loaded().model, reference)
            return ExpertAllocation("plain-lora", [1] * n_layers, [1] * n_layers), {"rank": rank, "alpha": 2.0 * rank}
        if method.startswith("layerif-"):
            scores = self.scores(task).scores(method.split("-")[1])
            return allocate_experts("layerif", n_layers, BUDGET, scores=scores, beta=BETA), {}
        if method in ("random", "reversed"):
            scores = self.scores(task).scores("S_pos")
            return allocate_experts(method, n_layers, BUDGET, scores=scores, beta=BETA, seed=seed), {}
        if method == "alphalora":
            if self._alphas is None:
                self._alphas = model_alphas(self.loaded().model)
            return allocate_experts("alphalora", n_layers, BUDGET, alphas=self._alphas, beta=BETA), {}
        return allocate_experts(method, n_layers, BUDGET, beta=BETA), {}

    def train(self, task: str, method: str, seed: int, steps: int, on_step=None):
        from layerif.moe import MoEConfig, TrainConfig, inject_moe
        from layerif.moe.train import train_moe

        allocation, options = self.allocation(task, method, seed)
        loaded = self.fresh()
        config = MoEConfig(counts=allocation.counts, top_k=allocation.top_k, **options)
        inject_moe(loaded.model, config, seed=seed)
        train_config = TrainConfig(steps=steps, lr=LR, batch_size=BATCH, train_on_inputs=False, seed=seed)
        log = train_moe(loaded.model, loaded.tokenizer, self.rows(task, "train"), train_config, quiet=True,
                        on_step=on_step)
        return loaded.model, allocation, log

    def curve(self, task: str) -> dict:
        """Validation accuracy of the uniform MoE every EVAL_EVERY steps (and of the base model)."""
        def compute() -> dict:
            val = self.rows(task, "validation")[:N_VAL]
            base = self.accuracy_rows(self.loaded().model, val)
            points: list[dict] = []

            def evaluate(step: int) -> None:
                if step % EVAL_EVERY == 0:
                    model.eval()
                    points.append({"step": step, "correct": self.accuracy_rows(model, val)})

            from layerif.moe import MoEConfig, TrainConfig, inject_moe
            from layerif.moe.train import train_moe

            allocation, _ = self.allocation(task, "uniform", 0)
            loaded = self.fresh()
            model = loaded.model
            inject_moe(model, MoEConfig(counts=allocation.counts, top_k=allocation.top_k), seed=0)
            log = train_moe(model, loaded.tokenizer, self.rows(task, "train"),
                            TrainConfig(steps=MAX_STEPS, lr=LR, batch_size=BATCH, train_on_inputs=False, seed=0),
                            quiet=True, on_step=evaluate)
            # The uniform MoE's seed-0 run at MAX_STEPS: reused by run_unit when the chosen steps are MAX_STEPS.
            final = self.test_record(model, task, "uniform", 0, MAX_STEPS, allocation, log)
            return {"base": base, "points": points, "final_run": {**final, "from_curve": True}}

        return self.units.run(f"curve-{task}", compute)

    def run_unit(self, task: str, method: str, seed: int, steps: int) -> dict:
        final = (self.units.get(f"curve-{task}") or {}).get("final_run")
        if final and (final["method"], final["seed"], final["steps"]) == (method, seed, steps):
            return self.units.run(f"run-{task}-{method}-s{seed}", lambda: dict(final))

        def compute() -> dict:
            model, allocation, log = self.train(task, method, seed, steps)
            return self.test_record(model, task, method, seed, steps, allocation, log)

        return self.units.run(f"run-{task}-{method}-s{seed}", compute)

    def test_record(self, model, task: str, method: str, seed: int, steps: int, allocation, log: dict) -> dict:
        """A trained run's record: per-row test correctness and its training log's figures."""
        model.eval()
        t0 = time.perf_counter()
        correct = self.accuracy_rows(model, self.rows(task, "test")[:N_TEST])
        return {"task": task, "method": method, "seed": seed, "steps": steps, "counts": allocation.counts,
                "correct": correct, "accuracy": float(np.mean(correct)), "train_s": log["seconds"],
                "eval_s": time.perf_counter() - t0, "micro_batch_size": log["micro_batch_size"],
                "final_loss": log["final_loss"]}

    def base_unit(self, task: str) -> dict:
        def compute() -> dict:
            correct = self.accuracy_rows(self.loaded().model, self.rows(task, "test")[:N_TEST])
            return {"correct": correct, "accuracy": float(np.mean(correct))}

        return self.units.run(f"base-{task}", compute)


def screen(curve: dict) -> tuple[bool, int, str]:
    """(kept, steps, reason) of a task from its validation curve."""
    from layerif.evaluate.stats import compare_accuracy

    points = curve["points"]
    if not points:
        return False, 0, "no validation point"
    accs = np.array([np.mean(p["correct"]) for p in points])
    best = int(np.argmax(accs))
    se = math.sqrt(accs[best] * (1 - accs[best]) / max(1, len(points[best]["correct"]) - 1))
    steps = int(points[int(np.flatnonzero(accs >= accs[best] - se)[0])]["step"])
    versus = compare_accuracy(points[best]["correct"], curve["base"])
    kept = versus.verdict(higher_is_better=True) == "better" or KEEP_ALL
    reason = (f"uniform MoE best validation accuracy {100 * accs[best]:.1f} % at step {points[best]['step']} vs base "
              f"{100 * np.mean(curve['base']):.1f} %: {acc_text(versus)} → {'kept' if kept else 'left out'}")
    return kept, steps, reason


def schedule(study: MoEStudy, tasks, report: bool = True) -> None:
    """Per task: curve, then (if kept) base, seeds 0 and 1 of CORE, plain LoRA; then the rest, seed by seed."""
    kept = {}

    def run(task: str, method: str, seed: int) -> None:
        study.run_unit(task, method, seed, kept[task])
        if report:
            write_report(study, tasks)

    for task in tasks:
        ok, steps, _ = screen(study.curve(task))
        if not ok:
            continue
        kept[task] = steps
        study.base_unit(task)
        for seed in SEEDS[:2]:
            for method in CORE:
                run(task, method, seed)
        run(task, "plain-lora", SEEDS[0])
    ran_first = {(method, seed) for seed in SEEDS[:2] for method in CORE} | {("plain-lora", SEEDS[0])}
    for seed in SEEDS:
        for task in kept:
            for method in METHODS:
                if (method, seed) not in ran_first:
                    run(task, method, seed)


def majority_share(study: MoEStudy, task: str, split: str) -> str:
    """Accuracy (%) of always giving the split's most common answer, on the rows the study uses."""
    from collections import Counter

    rows = study.rows(task, split)[: N_VAL if split == "validation" else N_TEST]
    label, count = Counter(str(row["answer"]) for row in rows).most_common(1)[0]
    return f"{100 * count / len(rows):.1f} % ({label!r})"


def records(study: MoEStudy, task: str, method: str) -> list[dict]:
    return [r for seed in SEEDS
            if (r := study.units.get(f"run-{task}-{method}-s{seed}")) is not None]


def write_report(study: MoEStudy, tasks, command: str = "python bench/moe.py --standard", final: bool = False) -> None:
    """bench/results/moe_standard.md, .csv, .png from every finished unit."""
    from layerif.evaluate.stats import compare_accuracy

    units = study.units
    invocations = units.log_invocation({"started": STARTED, "command": command, "state": START_STATE,
                                        "end_state": machine_state(), "report_only": REPORT_ONLY})
    lines = ["# LoRA-MoE study — SmolLM2-135M, standard preset", "",
             f"Command: `{command}`. Wall time {wall_hours(invocations):.2f} h (the invocations that ran units); "
             f"compute time of the finished units {units.total_seconds() / 3600:.2f} h. "
             f"Machine: {describe_state(invocations)}.", ""]
    if not final:
        lines += ["**Partial tables**: the study has not finished; missing rows are still to run.", ""]
    lines += [__doc__.split("\n\n", 1)[1].split("Sizing")[0].strip(), "", "## Tasks (validation curves)", ""]
    kept = []
    for task in tasks:
        curve = units.get(f"curve-{task}")
        if curve is None:
            lines.append(f"- {task}: not run yet (no validation curve)")
            continue
        ok, steps, reason = screen(curve)
        lines.append(f"- {task}: {reason}" + (f"; {steps} training steps for every allocation" if ok else ""))
        lines.append("  validation accuracy (%) by step: " + ", ".join(
            [f"base {100 * np.mean(curve['base']):.1f}"]
            + [f"{p['step']}: {100 * np.mean(p['correct']):.1f}" for p in curve["points"]])
            + f"; always answering the most common label: validation {majority_share(study, task, 'validation')}, "
              f"test {majority_share(study, task, 'test')}")
        if ok:
            kept.append(task)
    lines.append("")
    verdicts, csv_rows, by_method, noise = [], [], {}, []
    for task in kept:
        ours = records(study, task, "layerif-S_pos")
        base = units.get(f"base-{task}")
        lines += [f"## {task}", "", f"Base model: {100 * base['accuracy']:.1f} %." if base else "",
                  "", "| allocation | runs | accuracy (%) mean (min–max) | LayerIF S_pos − row, pts [95 %], p |",
                  "|---|---|---|---|"]
        for method in METHODS:
            runs = records(study, task, method)
            if not runs:
                continue
            by_method.setdefault(method, {})[task] = runs
            if len(runs) >= 2:
                # same allocation, another training seed: the size of a difference training randomness alone makes
                noise.append(f"- {task}, {method}: seed {runs[1]['seed']} − seed {runs[0]['seed']} = "
                             f"{acc_text(compare_accuracy(runs[1]['correct'], runs[0]['correct']))}")
            accs = [100 * r["accuracy"] for r in runs]
            delta = "—"
            if method != "layerif-S_pos" and ours:
                comparison = compare_accuracy([r["correct"] for r in ours], [r["correct"] for r in runs])
                delta = acc_text(comparison)
                verdicts.append((task, method, comparison, f"; seeds {len(ours)} vs {len(runs)}"))
            spread = f"{np.mean(accs):.1f} ({min(accs):.1f}–{max(accs):.1f})" if len(accs) > 1 else f"{accs[0]:.1f}"
            lines.append(f"| {method} | {len(runs)} | {spread} | {delta} |")
            csv_rows += [{"task": task, "method": method, "seed": r["seed"], "steps": r["steps"],
                          "accuracy": r["accuracy"], "counts": " ".join(map(str, r["counts"])),
                          "train_s": r["train_s"], "eval_s": r["eval_s"]} for r in runs]
        lines.append("")
    averaged = []
    ours_all = by_method.get("layerif-S_pos", {})
    for method, per_task in by_method.items():
        shared = sorted(set(per_task) & set(ours_all))
        if method == "layerif-S_pos" or len(shared) < 2:
            continue
        comparison = compare_accuracy({t: [r["correct"] for r in ours_all[t]] for t in shared},
                                      {t: [r["correct"] for r in per_task[t]] for t in shared})
        averaged.append((f"mean of {', '.join(shared)}", method, comparison, ""))
    if noise:
        lines += ["## Training noise (same allocation, another seed)", "",
                  "The intervals above resample test rows (seeds averaged inside a resample); they do not see how "
                  "much another training seed moves a run. These rows do:", "", *noise, ""]
    lines += ["## Verdict", ""]
    for where, method, comparison, seeds in verdicts + averaged:
        lines.append(f"- {where}: LayerIF S_pos vs **{method}**: **{comparison.verdict(higher_is_better=True)}** "
                     f"({acc_text(comparison)}{seeds})")
    if not verdicts:
        lines.append("No comparison has finished yet.")
    write_tables(RESULTS, REPORT, lines, csv_rows)
    write_plot(study, tasks, kept)


def write_plot(study: MoEStudy, tasks, kept) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerif.io import atomic_savefig

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for task in tasks:
        curve = study.units.get(f"curve-{task}")
        if curve and curve["points"]:
            line = axes[0].plot([p["step"] for p in curve["points"]],
                                [100 * np.mean(p["correct"]) for p in curve["points"]], marker="o", label=task)
            axes[0].axhline(100 * np.mean(curve["base"]), color=line[0].get_color(), linestyle=":")
    axes[0].set_title("uniform MoE validation accuracy (dotted: base model)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    rows, labels = [], []
    for task in kept[:1]:
        for method in METHODS:
            runs = records(study, task, method)
            if runs:
                rows.append(runs[0]["counts"])
                labels.append(method)
    if rows:
        image = axes[1].imshow(np.asarray(rows), aspect="auto", cmap="viridis")
        axes[1].set_yticks(range(len(labels)), labels, fontsize=7)
        axes[1].set_xlabel("layer")
        axes[1].set_title(f"experts per layer ({kept[0]}, seed 0)")
        figure.colorbar(image, ax=axes[1])
    figure.tight_layout()
    atomic_savefig(RESULTS / f"{REPORT}.png", figure)
    plt.close(figure)




def print_plan(tasks) -> None:
    units = PlannedUnits(WORK, {"base": [0, 0], "points": [{"step": MAX_STEPS, "correct": [1, 1]}]})  # unrun curves: assume kept
    schedule(MoEStudy(units), tasks, report=False)
    total = 0.0
    for key in units.planned:
        kind = key.split("-")[0]
        total += ESTIMATES.get(kind, 900)
        print(f"{total / 3600:6.2f} h  {key}  (estimated; scores run inside the first unit that needs them)")


STARTED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
START_STATE: dict = {}
REPORT_ONLY = False


def shrink_for_smoke() -> None:
    """Tiny sizes that run the whole machinery in minutes (a check of the code, not a result)."""
    global TASKS, SEEDS, MAX_STEPS, EVAL_EVERY, N_VAL, N_TEST, SCORE_TRAIN, SCORE_VAL, WORK, REPORT, RESULTS, BATCH
    global BUDGET, KEEP_ALL
    KEEP_ALL = True
    TASKS, SEEDS, MAX_STEPS, EVAL_EVERY, N_VAL, N_TEST, BATCH = ("rte", "mrpc"), (0, 1), 4, 2, 6, 6, 2
    SCORE_TRAIN, SCORE_VAL, BUDGET = 6, 3, 12
    WORK, REPORT = REPO / "runs" / "bench-moe-standard-smoke", "moe_standard_smoke"
    RESULTS = WORK


def main(threads: int = 2, smoke: bool = False, model: str = "smollm2-135m", plan: bool = False,
         report_only: bool = False) -> int:
    """Run (or resume) the study and write its report."""
    if smoke:
        shrink_for_smoke()
    torch.set_num_threads(threads)
    if plan:
        print_plan(TASKS)
        return 0
    START_STATE.update(machine_state())
    global REPORT_ONLY
    REPORT_ONLY = report_only
    study = MoEStudy(Units(WORK), model)
    command = "python bench/moe.py --standard" + (" --smoke" if smoke else "")
    if not report_only:
        schedule(study, TASKS)
    write_report(study, TASKS, command, final=not report_only)
    print(f"wrote {RESULTS / f'{REPORT}.md'}")
    print(json.dumps({"units": len(list(WORK.glob('*.json')))}))
    return 0
