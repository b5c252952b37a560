"""The LoRA-MoE study (`python bench/moe.py --standard`): sizes and tasks over `layerif compare moe`, no logic of its own.

SmolLM2-135M (built-in GGUF, float32), LoRA-MoE on every projection (rank 8, alpha 16, dropout 0.05), top-k =
min(2, n_l), 5 experts per layer on average (T = 150), β 2.5, AdamW lr 3e-4, batches of 8 rows, loss on the
answer tokens only (the LM head only at those positions), label log-likelihood on the first 500 test rows.

- Screen per task: the uniform MoE (seed 0) trained for 400 steps, validation accuracy on the first 200
  validation rows every 50 steps. A task is kept only when the best point beats always answering the most
  common label of those rows by the two-level interval (`beats_constant_label`); its training steps are the
  first point within one standard error of the best, chosen on validation only.
- Allocations at T = 150: LayerIF S_pos (scores at 300 x 50 on the task's own train / validation rows),
  depth (a layer-index ramp over the scores' range), random (the S_pos counts permuted by the training
  seed), uniform; then MoLA-2468, MoLA-8642,
  AlphaLoRA, LayerIF S_top25 and a plain LoRA of about the uniform MoE's trainable parameters.
- Training seeds 0, 1, 2; run k of every allocation uses seed k (paired). Verdicts: accuracy difference in
  points with the two-level bootstrap (training seeds, then test rows) t interval, the row-only one beside it.

Stages, each a `layerif compare moe` run sharing one units folder per task (later stages reuse earlier runs):
the core four at 3 seeds on every kept task, then every allocation at seed 0, then every allocation at 3
seeds. The first task that passes the screen runs the first two stages (what decides the comparison) before the
next task is screened, so a verdict does not wait for every screen. Every unit (per-row correctness and its
record) is kept under bench/results/moe_standard/, which is committed, so a stopped study resumes in a later
session or on a new machine; after each unit bench/results/moe_standard.md, .csv and .png are rewritten from
everything finished (partial tables marked).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "moe"
RESULTS = REPO / "bench" / "results"
WORK = RESULTS / "moe_standard"  # committed, so the study outlives a machine
SMOKE_WORK = REPO / "runs" / "bench-moe-standard-smoke"
STEM = "moe_standard"
TASKS = ("rte", "scienceqa", "openbookqa", "commonsenseqa", "cola", "mrpc")  # not yet screened first
CORE = "layerif,depth,random,uniform"
ALL = CORE + ",mola-2468,mola-8642,alphalora,layerif:S_top25,plain-lora"
STAGES = (("core", CORE, 3), ("all-s1", ALL, 1), ("all", ALL, 3))
DECIDING = 2  # the first kept task runs these stages before the next screen (the bar)
SIZES = dict(batch_size=8, lr=3e-4, n_test=500, score_train=300, score_val=50, resamples=10_000)
SCREEN = dict(steps=400, curve_every=50, n_val=200)
SMOKE = dict(batch_size=2, n_test=6, n_train=16, score_train=6, score_val=3, resamples=300)
SMOKE_SCREEN = dict(steps=4, curve_every=2, n_val=6)
SMOKE_STAGES = (("core", CORE, 2), ("all-s1", ALL, 1))


def here(path: Path) -> str:
    """`path` relative to the working directory: the committed records name no machine's folders."""
    return os.path.relpath(path)


class Study:
    """The screens and comparisons of every task, and the results file written from whatever has finished."""

    def __init__(self, smoke: bool = False, model: str = "smollm2-135m", work: Path | None = None,
                 data: Path = DATA, tasks=TASKS, keep_all: bool = False):
        self.smoke, self.model, self.data, self.tasks = smoke, model, Path(data), tuple(tasks)
        self.keep_all = keep_all  # smoke only: run the comparisons whatever the screen says
        self.work = work or (SMOKE_WORK if smoke else WORK)
        self.results = self.work if smoke else RESULTS  # a smoke report is not a result
        self.sizes, self.screen_sizes = (SMOKE, SMOKE_SCREEN) if smoke else (SIZES, SCREEN)
        self.stages = SMOKE_STAGES if smoke else STAGES
        self.screens: dict[str, object] = {}  # task -> its screening result
        self.latest: dict[str, object] = {}  # task -> its latest (maybe partial) comparison
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.clock = time.perf_counter()

    def job(self, task: str, folder: str, **arguments):
        from layerif.compare import CompareMoEJob

        return CompareMoEJob(model=self.model, task=here(self.data / task), out=here(self.work / folder),
                             dtype="float32", overwrite=True, quiet=False, **{**self.sizes, **arguments})

    def kept(self) -> list[str]:
        return [task for task in self.tasks if task in self.screens
                and (self.keep_all or self.screens[task].curve["screen"]["kept"])]

    def run(self) -> None:
        ran: set[tuple[str, str]] = set()
        for task in self.tasks:
            self.screens[task] = self.job(task, f"screen-{task}", screen_only=True, allocations="uniform,depth",
                                          units=here(self.work / f"units-screen-{task}"), **self.screen_sizes).run()
            self.write()
            if self.kept()[:1] == [task]:
                for stage in self.stages[:DECIDING]:
                    self.compare(task, *stage, ran=ran)
        for stage in self.stages:
            for task in self.kept():
                self.compare(task, *stage, ran=ran)

    def compare(self, task: str, stage: str, allocations: str, seeds: int, ran: set[tuple[str, str]]) -> None:
        """One stage of one kept task (once per invocation), its partial tables rewritten after every unit."""
        if (task, stage) in ran:
            return
        ran.add((task, stage))
        result = self.job(task, f"{task}-{stage}", allocations=allocations, seeds=seeds,
                          steps=self.screens[task].curve["steps"], units=here(self.work / f"units-{task}"),
                          on_unit=lambda partial, task=task: self.update(task, partial)).run()
        self.update(task, result)

    def update(self, task: str, result) -> None:
        self.latest[task] = result
        self.write()

    def load_finished(self) -> None:
        """Results an earlier invocation published (the partial ones come back when rerun)."""
        from layerif.compare import MoECompareResult

        def read(folder: str):
            path = self.work / folder / "compare.json"
            return MoECompareResult.from_dict(json.loads(path.read_text())) if path.is_file() else None

        for task in self.tasks:
            if task not in self.screens and (screen := read(f"screen-{task}")) is not None:
                self.screens[task] = screen
            if task not in self.latest:
                finished = [result for stage, _, _ in self.stages if (result := read(f"{task}-{stage}"))]
                if finished:
                    self.latest[task] = finished[-1]

    def write(self) -> None:
        """moe_standard.md, .csv and .png from every finished screen and comparison."""
        from layerif.compare.moe import moe_markdown
        from layerif.compare.units import machine_state
        from layerif.io import atomic_write_text

        self.load_finished()
        command = "python bench/moe.py --standard" + (" --smoke" if self.smoke else "")
        done = all(task in self.screens for task in self.tasks) and all(
            task in self.latest and self.latest[task].complete
            and self.latest[task].setting["seeds"] == self.stages[-1][2]
            and len(self.latest[task].arms) == len(self.stages[-1][1].split(",")) for task in self.kept())
        seconds = sum(r.seconds for r in [*self.screens.values(), *self.latest.values()])
        state = machine_state()
        lines = ["# LoRA-MoE study — SmolLM2-135M, standard preset", "",
                 f"Command: `{command}`. This invocation started {self.started}, "
                 f"{(time.perf_counter() - self.clock) / 3600:.2f} h ago; compute time of the finished units "
                 f"{seconds / 3600:.2f} h. Machine: {state['cpus']} CPUs, torch {state['torch']} with "
                 f"{state['torch_threads']} threads, load average {state.get('load_average')}.", ""]
        if not done:
            lines += ["**Partial tables**: the study has not finished; missing rows are still to run.", ""]
        lines += [__doc__.split("\n\n", 1)[1].split("Stages,")[0].strip(), "", "## Screen (validation curves)", ""]
        for task in self.tasks:
            if task not in self.screens:
                lines += [f"- {task}: not screened yet", ""]
                continue
            lines += moe_markdown(self.screens[task], heading="###")
        rows = []
        for task in self.kept():
            if task in self.latest:
                lines += moe_markdown(self.latest[task], heading="##")
                rows += [{"task": task, **{k: v for k, v in run.items() if k not in ("counts", "top_k")},
                          "counts": " ".join(map(str, run["counts"]))} for run in self.latest[task].runs]
        if not self.kept():
            lines += ["No task passed the screen yet: no comparison has run.", ""]
        self.results.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.results / f"{STEM}.md", "\n".join(lines) + "\n")
        if rows:
            from layerif.compare.results import csv_text

            atomic_write_text(self.results / f"{STEM}.csv", csv_text(rows))
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from layerif.io import atomic_savefig

        figure, axis = plt.subplots(figsize=(7, 4.5))
        for task, screen in self.screens.items():
            curve = screen.curve
            line = axis.plot([p["step"] for p in curve["points"]], [100 * p["accuracy"] for p in curve["points"]],
                             marker="o", label=task)
            axis.axhline(100 * curve["screen"]["constant_accuracy"], color=line[0].get_color(), linestyle=":")
        axis.set_title("uniform MoE validation accuracy (dotted: the constant label)")
        axis.set_xlabel("step")
        axis.set_ylabel("accuracy (%)")
        if self.screens:
            axis.legend(fontsize=7)
        figure.tight_layout()
        atomic_savefig(self.results / f"{STEM}.png", figure)
        plt.close(figure)


def main(threads: int = 2, smoke: bool = False, model: str = "smollm2-135m", report_only: bool = False,
         tasks: str | None = None) -> int:
    """Run (or resume) the study and rewrite bench/results/moe_standard.* from every finished unit."""
    import torch

    torch.set_num_threads(threads)
    study = Study(smoke, model, tasks=tuple(tasks.split(",")) if tasks else TASKS)
    if not report_only:
        study.run()
    study.write()
    print(f"wrote {study.results / f'{STEM}.md'}")
    return 0
