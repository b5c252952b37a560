"""The pruning study (`python bench/pruning.py --standard`): sizes over `layerif compare prune`, no logic of its own.

SmolLM2-135M (built-in GGUF, float32). LayerIF scores: one 300 x 50 run (DataInf, all block matrices) on
`tasks`, the first 75 rows of each of BoolQ, ARC-e, ARC-c, OpenBookQA train as train and the next 12-13 of
each as validation. Settings: Wanda 70 %, SparseGPT 70 %, Wanda 60 %, each with LayerIF S_pos, depth,
random (3 placements), uniform, OWL and AlphaPruning; calibration 128 x 512 tokens of WikiText-2 valid at 3
calibration seeds; ε from {0.2, 0.3, 0.4, 0.5} on the last 96 windows of 512 tokens of WikiText-2 valid (never
drawn for calibration); test on the first 200 windows of 512 tokens of WikiText-2 test. Where LayerIF does not
beat depth, a second comparison runs the variants S_top25, the `identity` estimator profile and a
`--modules attn` profile against LayerIF and depth (sharing their finished units). Zero-shot accuracy (ARC-e,
ARC-c, OpenBookQA, RTE, first 500 rows each) on each allocation's first run (calibration seed 0) and the dense model.

Every unit (its per-window NLL and JSON record) and the 300 x 50 scores are kept under
bench/results/pruning_full/, which is committed: a stopped study resumes there, in a later session or on a new
machine (only the Wanda masks, big and recomputable, stay out of git). After each unit
bench/results/pruning_full.md, .csv and .png are rewritten from everything finished (partial tables marked).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
WORK = RESULTS / "pruning_full"  # committed, so the study outlives a machine
SMOKE_WORK = REPO / "runs" / "bench-pruning-full-smoke"
STEM = "pruning_full"
SETTINGS = (("wanda", 0.7), ("sparsegpt", 0.7), ("wanda", 0.6))
MAIN = "layerif,depth,random,uniform,owl,alphapruning"
VARIANTS = "layerif,depth,layerif:S_top25,layerif@identity,layerif@attn"
SIZES = dict(calib_seeds=3, random_seeds=3, epsilon_grid="0.2,0.3,0.4,0.5", valid_windows=96, test_windows=200,
             window_length=512, calib_sequences=128, calib_length=512, block_windows=10, resamples=10_000)
SMOKE = dict(calib_seeds=2, random_seeds=2, epsilon_grid="0.2,0.4", valid_windows=4, test_windows=8,
             window_length=64, calib_sequences=4, calib_length=64, block_windows=2, resamples=500)
# zero-shot on each allocation's first run (round 2's tasks and rows; BoolQ's rows carry no passage)
ZEROSHOT = dict(zeroshot="arc_easy,arc_challenge,openbookqa,rte", zeroshot_limit=500)
SCORE_TASKS = ("boolq", "arc_easy", "arc_challenge", "openbookqa")
PROFILES = {"default": {}, "identity": {"estimator": "identity"}, "attn": {"modules": "attn"}}
# Put under the title of every comparison page: whether the machine was idle is known to the sessions that ran the
# units, not to the units, and the notes file beside the study page keeps it per session.
NOTES_POINTER = f"Machine state when each unit ran (idle or not, per session): `../../{STEM}.notes.md`."


def here(path: Path) -> str:
    """`path` relative to the working directory: the committed records name no machine's folders."""
    return os.path.relpath(path)


def setting_name(method: str, sparsity: float) -> str:
    return f"{method}-{round(100 * sparsity)}"


def score_profile(label: str, work: Path, n_train: int, n_val: int, model: str) -> str:
    """The folder of one LayerIF profile on `tasks`, scored with `layerif score` once (reused after)."""
    from layerif import ScoreConfig
    from layerif.data import load_rows
    from layerif.io import atomic_write_text
    from layerif.runs import ScoreRun, run_score

    out = work / ("scores-tasks" if label == "default" else f"scores-tasks-{label}")
    if (out / "run.json").is_file():
        return here(out)
    rows = {"train": [], "val": []}
    per_task_train, per_task_val = n_train // len(SCORE_TASKS), n_val // len(SCORE_TASKS)
    for i, task in enumerate(SCORE_TASKS):
        # 300 / 4 = 75 train each; 50 / 4 -> 13, 13, 12, 12 validation (the first tasks take the remainder)
        n_v = per_task_val + (i < n_val % len(SCORE_TASKS))
        n_t = per_task_train + (i < n_train % len(SCORE_TASKS))
        task_rows = load_rows(DATA / "zeroshot" / task / "train.jsonl")
        rows["train"] += task_rows[:n_t]
        rows["val"] += task_rows[n_t : n_t + n_v]
    for split, items in rows.items():
        atomic_write_text(work / "score-data" / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in items))
    config = ScoreConfig(n_train=n_train, n_val=n_val, quiet=True, **PROFILES[label])
    run_score(ScoreRun(model=model, train=here(work / "score-data" / "train.jsonl"),
                       val=here(work / "score-data" / "val.jsonl"), out=here(out), dtype="float32", config=config))
    return here(out)


class Study:
    """The settings' comparisons and the results file written from whatever has finished."""

    def __init__(self, smoke: bool = False, model: str = "smollm2-135m", work: Path | None = None):
        self.smoke, self.model = smoke, model
        self.work = work or (SMOKE_WORK if smoke else WORK)
        self.results = self.work if smoke else RESULTS  # a smoke report is not a result
        self.sizes = SMOKE if smoke else SIZES
        self.latest: dict[str, object] = {}  # comparison folder -> its latest (maybe partial) result
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.clock = time.perf_counter()

    def scores(self, labels) -> tuple[str, ...]:
        n_train, n_val = (8, 4) if self.smoke else (300, 50)
        return tuple(f"{label}={score_profile(label, self.work, n_train, n_val, self.model)}" if label != "default"
                     else score_profile(label, self.work, n_train, n_val, self.model) for label in labels)

    def job(self, method: str, sparsity: float, allocations: str, folder: str, labels=("default",),
            zeroshot: bool = False):
        from layerif.compare import ComparePruneJob

        text = DATA / "text" / "wikitext2"
        name = setting_name(method, sparsity)
        extra = {**ZEROSHOT, "data_dir": here(DATA)} if zeroshot else {}
        if zeroshot and self.smoke:
            extra["zeroshot_limit"] = 3
        return ComparePruneJob(model=self.model, out=here(self.work / folder), calib=here(text / "valid.txt"),
                               test=here(text / "test.txt"), scores=self.scores(labels), method=method,
                               sparsity=sparsity, allocations=allocations, units=here(self.work / f"units-{name}"),
                               dtype="float32", overwrite=True, quiet=False,
                               on_unit=lambda result: self.update(folder, result), **self.sizes, **extra)

    def update(self, folder: str, result) -> None:
        self.latest[folder] = result
        self.write()

    def run(self, settings, variants: bool = True) -> None:
        for method, sparsity in settings:
            name = setting_name(method, sparsity)
            result = self.job(method, sparsity, MAIN, name, zeroshot=True).run()
            self.update(name, result)
            headline = next(v for v in result.verdicts if v["allocation"] == "layerif" and v["baseline"] == "depth")
            if variants and headline["reading"] != "better":
                folder = f"{name}-variants"
                self.update(folder, self.job(method, sparsity, VARIANTS, folder, tuple(PROFILES)).run())

    def load_saved(self) -> None:
        """Partial results of the main comparisons whose units exist but which were never published (a stopped
        study), rebuilt from the units without running any."""
        for method, sparsity in SETTINGS:
            name = setting_name(method, sparsity)
            if name not in self.latest and (self.work / f"units-{name}" / "manifest.json").is_file():
                self.latest[name] = self.job(method, sparsity, MAIN, name, zeroshot=True).saved_result()

    def load_finished(self) -> None:
        """Results of comparisons an earlier invocation published (the partial ones come back when rerun)."""
        from layerif.compare import CompareResult

        for method, sparsity in SETTINGS:
            for folder in (setting_name(method, sparsity), f"{setting_name(method, sparsity)}-variants"):
                path = self.work / folder / "compare.json"
                if folder not in self.latest and path.is_file():
                    self.latest[folder] = CompareResult.from_dict(json.loads(path.read_text()))

    def profile_lines(self) -> list[str]:
        """How the variant profiles rank the blocks beside the default one and beside depth (Spearman)."""
        import numpy as np
        from scipy.stats import spearmanr

        from layerif.scores import LayerScores

        folders = {label: self.work / ("scores-tasks" if label == "default" else f"scores-tasks-{label}")
                   for label in PROFILES}
        profiles = {label: np.asarray(LayerScores.load(path).scores("S_pos"))
                    for label, path in folders.items() if (path / "run.json").is_file()}
        if "default" not in profiles or len(profiles) < 2:
            return []
        depth = np.arange(len(profiles["default"]))
        lines = ["## Score profiles", "", "S_pos per block of each profile on `tasks`, Spearman over the blocks "
                 "(what the allocation sees):", "", "| profile | vs default (DataInf, all matrices) | vs depth "
                 "(block index) |", "|---|---|---|"]
        for label, values in profiles.items():
            lines.append(f"| {label} | {spearmanr(values, profiles['default'])[0]:.2f} | "
                         f"{spearmanr(values, depth)[0]:.2f} |")
        return lines + [""]

    def point_to_notes(self) -> None:
        """Put the notes pointer under the title of each published comparison page that lacks it (when the notes
        file it names exists)."""
        from layerif.io import atomic_write_text

        if not (self.work.parent / f"{STEM}.notes.md").is_file():
            return
        for folder in self.latest:
            page = self.work / folder / "compare.md"
            if not page.is_file():
                continue
            lines = page.read_text().splitlines()
            if not any(line.startswith(NOTES_POINTER.split(":")[0]) for line in lines):
                atomic_write_text(page, "\n".join([*lines[:2], NOTES_POINTER, "", *lines[2:]]) + "\n")

    def write(self) -> None:
        from bench_tables import write_study

        self.load_finished()
        self.point_to_notes()
        command = "python bench/pruning.py --standard" + (" --smoke" if self.smoke else "")
        write_study(self.results, STEM, self.latest, command, self.started, time.perf_counter() - self.clock,
                    [setting_name(m, s) for m, s in SETTINGS], self.profile_lines())


def main(settings: str | None = None, variants: bool = True, report_only: bool = False, smoke: bool = False,
         model: str = "smollm2-135m") -> None:
    """Run (or resume) the study and rewrite bench/results/pruning_full.* from every finished unit."""
    chosen = SETTINGS if settings is None else tuple(
        (part.split("-")[0], int(part.split("-")[1]) / 100) for part in settings.split(","))
    study = Study(smoke, model)
    if not report_only:
        study.run(chosen, variants)
    else:
        study.load_finished()
        study.load_saved()
    study.write()
    print(f"wrote {study.results / f'{STEM}.md'}")
