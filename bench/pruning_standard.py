"""The `standard` pruning study (`python bench/pruning.py --standard`): does LayerIF beat a depth prior?

SmolLM2-135M (built-in GGUF, float32). Everything the DESIGN §7 asks of a results claim:

- LayerIF scores at the paper's size, 300 x 50, once per profile: `tasks` (a mix of the zero-shot tasks' train
  splits, the first 75 rows of each of BoolQ, ARC-e, ARC-c, OpenBookQA as train and the next 12-13 of each as
  validation); S_pos and S_top25 come from the same run.
- Standard grid (what fits 2.5 h on 2 idle cores): Wanda at 70 %, calibration 128 x 512 tokens of WikiText-2
  valid (its calibration part), calibration seed 0; allocations LayerIF S_pos, depth, random (placement seed 0)
  and uniform; where S_pos does not beat depth on test perplexity, the variant LayerIF S_top25 (same ε as S_pos)
  runs too.
- ε for LayerIF S_pos and depth chosen from {0.05, 0.1, 0.2, 0.3} by perplexity on the last 32
  non-overlapping 512-token windows of WikiText-2 valid (never drawn for calibration), calibration seed 0;
  random uses the ε chosen for LayerIF S_pos (same spread, placement permuted).
- Test: perplexity on the first 200 windows of 512 tokens of WikiText-2 test, zero-shot ARC-e, ARC-c,
  OpenBookQA, RTE on the first 500 rows each (BoolQ in its own column: its rows carry no passage).
- Statistics: per-window NLL and per-row correctness kept; paired bootstrap (10,000 seeded resamples) of
  LayerIF minus each alternative, seeds averaged inside a resample, perplexity windows resampled in runs of 10
  consecutive windows (about one article: consecutive windows are not independent); spread over seeds beside
  it when a configuration has several runs.
- `--full` continues the same work folder with the whole grid the issue describes: Wanda 70 %, SparseGPT 70 %,
  Wanda 60 %; 3 calibration seeds; random over 5 placement seeds; OWL, AlphaPruning (ε tuned), LayerIF S_top25,
  reversed; the dense model; and the LayerIF variants (WikiText-2 score profile, `--modules attn` scores, no
  smoothing) where S_pos does not beat depth. Its report is bench/results/pruning_full.md.

Sizing, measured alone on 2 idle cores (float32, torch 2 threads; the first invocation of the committed run):
one 300 x 50 scoring 444 s; a Wanda prune with 128 x 512 calibration ≈ 320 s (two block passes: statistics,
then the pruned outputs for the next block); an ε-selection unit (prune + 32 validation windows) 330–358 s;
test evaluation (200 x 512 perplexity + 7,549 lm-eval requests) 817 s. A test unit therefore costs ≈ 1,140 s,
or ≈ 820 s when it reuses the saved mask of its ε-selection prune (LayerIF and depth at seed 0). Standard grid:
scores 444 + 8 selection units ≈ 2,720 + 2 test units with reused masks ≈ 1,640 + random and uniform ≈ 2,280
≈ 7,100 s ≈ 2.0 h; where S_pos does not beat depth, the S_top25 variant adds ≈ 1,140 s (≈ 2.3 h). The whole grid (`--full`) is ≈ 30 h: the
standard grid keeps the statistics (200 windows, 500 rows, 10,000 resamples) and shrinks the grid (one
setting, one calibration seed, one placement seed, the two controls, uniform and one variant). Units run in
priority order and each is saved under runs/bench-pruning-standard/, so a run stopped at any time leaves
complete tables for what finished and a rerun continues; `--plan` prints every unit left with its projected
cumulative time, from the measured times of finished units when there are any.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from study import (
    PlannedUnits,
    Units,
    acc_text,
    describe_state,
    machine_state,
    ppl_text,
    wall_hours,
    write_tables,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
WORK = REPO / "runs" / "bench-pruning-standard"
REPORT = "pruning_standard"  # result file stem

SCORE_TASKS = ("boolq", "arc_easy", "arc_challenge", "openbookqa")
ZS_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "rte")
SIDE_TASK = "boolq"  # passage-less: reported in its own column, not in the mean
# (pruner, sparsity), in the order they run: the first is the headline setting
# The standard grid is what fits 2.5 h on 2 idle cores (see Sizing); `--full` runs the whole grid below it.
SETTINGS = (("wanda", 0.7),)
EPSILONS = (0.05, 0.1, 0.2, 0.3)
TUNED = ("layerif", "depth", "alphapruning")  # the allocations whose ε is chosen on validation
CALIB_SEEDS = (0,)
RANDOM_SEEDS = (0,)
FULL_SETTINGS = (("wanda", 0.7), ("sparsegpt", 0.7), ("wanda", 0.6))
FULL_CALIB_SEEDS = (0, 1, 2)
FULL_RANDOM_SEEDS = (0, 1, 2, 3, 4)
CALIB_SEQUENCES, CALIB_LENGTH = 128, 512
PPL_WINDOWS, PPL_LENGTH, LIMIT = 200, 512, 500
# Consecutive test windows come from the same article (WikiText-2 test: 62 articles, ≈ 3,900 words each, about
# ten 512-token windows), so the perplexity verdict resamples runs of 10 windows; windows resampled one by one
# are shown beside it.
BLOCK_WINDOWS = 10
SELECT_WINDOWS = 32
SCORE_TRAIN, SCORE_VAL = 300, 50
# priority order: the first four answer "does LayerIF beat the depth prior / random placement?"
MAIN = ("layerif", "depth", "random", "uniform")
FULL_MAIN = (*MAIN, "alphapruning", "owl", "layerif-top25", "reversed")
FULL = False  # set by --full
# LayerIF variants, run only at settings where S_pos does not beat depth on test perplexity
VARIANTS = ("layerif-top25",)
FULL_VARIANTS = ("layerif-wikitext", "layerif-attn", "layerif-nosmooth")
# what each allocation of the study is: library allocation, score profile, score, smoothing, whose ε it uses
SPECS = {
    "layerif": ("layerif", "tasks", "S_pos", True, "layerif"),
    "layerif-top25": ("layerif", "tasks", "S_top25", True, "layerif"),
    "depth": ("depth", None, None, True, "depth"),
    "random": ("random", "tasks", "S_pos", True, "layerif"),
    "reversed": ("reversed", "tasks", "S_pos", True, "layerif"),
    "uniform": ("uniform", None, None, True, None),
    "owl": ("owl", None, None, True, None),
    "alphapruning": ("alphapruning", None, None, True, "alphapruning"),
    "layerif-wikitext": ("layerif", "wikitext", "S_pos", True, "layerif"),
    "layerif-attn": ("layerif", "tasks-attn", "S_pos", True, "layerif"),
    "layerif-nosmooth": ("layerif", "tasks", "S_pos", False, "layerif"),
}
# seconds per unit kind on 2 idle cores, used by --plan until finished units give measured times
ESTIMATES = {"dense": 820, "scores": 444, "inputs-alpha": 60, "inputs-owl": 330, "select-wanda": 340,
             "select-sparsegpt": 650, "test-wanda": 1140, "test-sparsegpt": 1460}


def setting_name(method: str, sparsity: float) -> str:
    return f"{method}-{round(100 * sparsity)}"


class Study:
    """Model, data and per-block inputs shared by every unit, loaded lazily (a finished study loads nothing)."""

    def __init__(self, units: Units, threads: int, model_name: str = "smollm2-135m"):
        self.units = units
        self.model_name = model_name
        self.threads = threads
        self._loaded = None
        self._valid_ids = None
        self._calib: dict[int, torch.Tensor] = {}
        self._outlier: dict[int, np.ndarray] = {}
        self._alpha = None

    # ---- shared inputs ----
    def model(self):
        if self._loaded is None:
            from layerif.models import load_model

            self._loaded = load_model(self.model_name, dtype="float32", quiet=True)
            self._dense = {k: v.clone() for k, v in self._loaded.model.state_dict().items()}
        return self._loaded.model, self._loaded.tokenizer

    def reset(self):
        model, tokenizer = self.model()
        model.load_state_dict(self._dense)
        return model, tokenizer

    def valid_ids(self) -> torch.Tensor:
        if self._valid_ids is None:
            from layerif.calibration import read_text, tokenize_text

            self._valid_ids = tokenize_text(read_text(DATA / "text" / "wikitext2" / "valid.txt"), self.model()[1])
        return self._valid_ids

    def calibration_part(self) -> torch.Tensor:
        """WikiText-2 valid without its last SELECT_WINDOWS windows (those select ε)."""
        return self.valid_ids()[: len(self.valid_ids()) - SELECT_WINDOWS * PPL_LENGTH]

    def selection_windows(self) -> torch.Tensor:
        ids = self.valid_ids()
        return ids[len(ids) - SELECT_WINDOWS * PPL_LENGTH :].view(SELECT_WINDOWS, PPL_LENGTH)

    def calib(self, seed: int) -> torch.Tensor:
        if seed not in self._calib:
            part = self.calibration_part()
            starts = np.random.default_rng(seed).integers(0, len(part) - CALIB_LENGTH, size=CALIB_SEQUENCES)
            self._calib[seed] = torch.stack([part[s : s + CALIB_LENGTH] for s in starts])
        return self._calib[seed]

    def alpha(self) -> np.ndarray:
        record = self.units.run("inputs-alpha", lambda: {"alpha": self._block_alpha().tolist()})
        return np.asarray(record["alpha"])

    def _block_alpha(self) -> np.ndarray:
        from layerif.allocate.metrics import block_alpha_hill

        return block_alpha_hill(self.reset()[0])

    def outlier(self, seed: int) -> np.ndarray:
        def compute() -> dict:
            from layerif.allocate.metrics import owl_outlier_ratios

            return {"outlier": owl_outlier_ratios(self.reset()[0], self.calib(seed)).tolist()}

        return np.asarray(self.units.run(f"inputs-owl-s{seed}", compute)["outlier"])

    def profile(self, name: str, score: str) -> np.ndarray:
        """Per-block LayerIF score `score` of the profile `name` (tasks, tasks-attn, wikitext), scored once."""
        from layerif.scores import LayerScores

        folder = self.units.folder / f"scores-{name}"

        def compute() -> dict:
            from layerif import ScoreConfig, score_layers

            train, val = self.score_rows(name)
            model, tokenizer = self.reset()
            config = ScoreConfig(n_train=len(train), n_val=len(val), modules="attn" if name == "tasks-attn" else "all",
                                 quiet=True)
            started = time.perf_counter()
            result = score_layers(model, tokenizer, train, val, config)
            result.save(folder)
            return {"folder": str(folder), "score_seconds": time.perf_counter() - started}

        self.units.run(f"scores-{name}", compute)
        return np.asarray(LayerScores.load(folder).scores(score), dtype=np.float64)

    def score_rows(self, name: str) -> tuple[list[dict], list[dict]]:
        if name == "wikitext":
            part = self.calibration_part()
            n = SCORE_TRAIN + SCORE_VAL
            chunks = part[: n * 128].view(n, 128)
            texts = [{"text": self.model()[1].decode(chunk)} for chunk in chunks]
            return texts[:SCORE_TRAIN], texts[SCORE_TRAIN:]
        from layerif.data import load_rows

        per_train = np.array_split(np.arange(SCORE_TRAIN), len(SCORE_TASKS))
        per_val = np.array_split(np.arange(SCORE_VAL), len(SCORE_TASKS))
        train, val = [], []
        for task, t_idx, v_idx in zip(SCORE_TASKS, per_train, per_val, strict=True):
            rows = load_rows(DATA / "zeroshot" / task / "train.jsonl")
            train += rows[: len(t_idx)]
            val += rows[len(t_idx) : len(t_idx) + len(v_idx)]
        return train, val

    # ---- units ----
    def prune(self, method: str, sparsity: float, allocation: str, epsilon: float | None, calib_seed: int,
              place_seed: int):
        from layerif.allocate.sparsity import allocate_sparsity
        from layerif.prune import prune_model

        library, profile, score, smooth, _ = SPECS[allocation]
        scores = self.profile(profile, score) if profile else None
        alpha = self.alpha() if library == "alphapruning" else None
        outlier = self.outlier(calib_seed) if library == "owl" else None
        model, _ = self.reset()
        plan = allocate_sparsity(model, library, sparsity, scores=scores, epsilon=0.3 if epsilon is None else epsilon,
                                 smooth_scores=smooth, alpha=alpha, outlier=outlier, seed=place_seed)
        # Wanda only zeroes weights, so its mask is the whole result: the ε-selection prune at calibration seed 0
        # is saved and the test run of the chosen ε reuses it instead of pruning again (≈ 320 s each).
        masks = None if method == "sparsegpt" else self.units.folder / "masks" / (
            f"{setting_name(method, sparsity)}-{allocation}-e{epsilon}-s{calib_seed}-r{place_seed}.npz")
        if masks is not None and masks.is_file():
            return model, plan, apply_masks(model, masks)
        report = prune_model(model, plan.matrix_ratios, method, self.calib(calib_seed), quiet=True)
        if masks is not None:
            save_masks(model, list(plan.matrix_ratios), masks)
        return model, plan, report

    def selection_unit(self, method: str, sparsity: float, allocation: str, epsilon: float) -> dict:
        from layerif.evaluate.perplexity import window_nll

        def compute() -> dict:
            model, plan, _ = self.prune(method, sparsity, allocation, epsilon, 0, 0)
            nll = window_nll(model, self.selection_windows())
            tokens = SELECT_WINDOWS * (PPL_LENGTH - 1)
            return {"valid_log_ppl": float(nll.sum()) / tokens, "valid_ppl": math.exp(float(nll.sum()) / tokens),
                    "block_ratios": plan.block_ratios.tolist()}

        key = f"select-{setting_name(method, sparsity)}-{allocation}-e{epsilon:g}"
        return self.units.run(key, compute)

    def chosen_epsilon(self, method: str, sparsity: float, allocation: str) -> float | None:
        tuned_by = SPECS[allocation][4]
        if tuned_by is None:
            return None
        sweep = {eps: self.selection_unit(method, sparsity, tuned_by, eps)["valid_ppl"] for eps in EPSILONS}
        return min(sweep, key=sweep.get)

    def test_unit(self, method: str, sparsity: float, allocation: str, calib_seed: int, place_seed: int = 0) -> dict:
        epsilon = self.chosen_epsilon(method, sparsity, allocation)

        def compute() -> dict:
            t0 = time.perf_counter()
            model, plan, report = self.prune(method, sparsity, allocation, epsilon, calib_seed, place_seed)
            t1 = time.perf_counter()
            record = evaluate(model, self.model()[1])
            record.update(epsilon=epsilon, calib_seed=calib_seed, place_seed=place_seed,
                          block_ratios=plan.block_ratios.tolist(), measured_sparsity=report.overall,
                          clipped=plan.clipped, prune_s=t1 - t0, eval_s=time.perf_counter() - t1,
                          mask_reused=isinstance(report, ReusedPrune))
            return record

        return self.units.run(unit_key(method, sparsity, allocation, calib_seed, place_seed), compute)

    def dense_unit(self) -> dict:
        def compute() -> dict:
            from layerif.evaluate.perplexity import window_nll

            model, tokenizer = self.reset()
            record = evaluate(model, tokenizer)
            nll = window_nll(model, self.selection_windows())
            record["valid_ppl"] = math.exp(float(nll.sum()) / (SELECT_WINDOWS * (PPL_LENGTH - 1)))
            return record

        return self.units.run("dense", compute)


class ReusedPrune:
    """What a test unit needs of a prune whose mask was loaded rather than computed."""

    def __init__(self, overall: float):
        self.overall = overall


def save_masks(model, names: list[str], path: Path) -> None:
    """The zero pattern of every pruned matrix, bit-packed, written atomically."""
    from layerif.io import atomic_write

    arrays = {}
    for name in names:
        zero = (model.get_submodule(name).weight == 0).cpu().numpy()
        arrays[name] = np.packbits(zero.ravel())
        arrays[f"{name}//shape"] = np.asarray(zero.shape)
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def apply_masks(model, path: Path) -> ReusedPrune:
    """Zero the weights a saved mask marks; returns the overall sparsity of the masked matrices."""
    zeros = total = 0
    with np.load(path) as saved, torch.no_grad():
        for name in [key for key in saved.files if "//" not in key]:
            shape = tuple(saved[f"{name}//shape"])
            zero = np.unpackbits(saved[name], count=int(np.prod(shape))).reshape(shape).astype(bool)
            weight = model.get_submodule(name).weight
            weight.masked_fill_(torch.from_numpy(zero).to(weight.device), 0.0)
            zeros, total = zeros + int(zero.sum()), total + zero.size
    return ReusedPrune(zeros / total)


def unit_key(method: str, sparsity: float, allocation: str, calib_seed: int, place_seed: int = 0) -> str:
    extra = f"-r{place_seed}" if allocation == "random" else ""
    return f"test-{setting_name(method, sparsity)}-{allocation}-s{calib_seed}{extra}"


def runs_of(allocation: str) -> list[tuple[int, int]]:
    """(calibration seed, placement seed) of every run of an allocation."""
    if allocation == "random":
        return [(seed % len(CALIB_SEEDS), seed) for seed in RANDOM_SEEDS]
    return [(seed, 0) for seed in CALIB_SEEDS]


def evaluate(model, tokenizer) -> dict:
    """Test perplexity (per-window NLL) and zero-shot per-row correctness."""
    from layerif.evaluate.perplexity import perplexity
    from layerif.evaluate.zeroshot import zeroshot_accuracy

    ppl = perplexity(model, tokenizer, DATA / "text" / "wikitext2" / "test.txt", PPL_LENGTH, PPL_WINDOWS,
                     batch_size=4, quiet=True)
    zero = zeroshot_accuracy(model, tokenizer, (*ZS_TASKS, SIDE_TASK), DATA, LIMIT, batch_size=16, quiet=True)
    return {"ppl": ppl["perplexity"], "window_nll": ppl["window_nll"], "window_tokens": ppl["window_tokens"],
            "correct": {task: entry["correct"] for task, entry in zero["tasks"].items()},
            "acc": {task: entry["acc"] for task, entry in zero["tasks"].items()}}


def unit_kind(key: str) -> str:
    parts = key.split("-")
    if parts[0] in ("select", "test"):
        return f"{parts[0]}-{parts[1]}"
    return "inputs-owl" if key.startswith("inputs-owl") else parts[0] if parts[0] != "inputs" else key




def unfinished(settings) -> list[str]:
    """The units of the grid (variants aside) that have not finished, in run order."""
    units = PlannedUnits(WORK, {"valid_ppl": 0.0})
    schedule(Study(units, 2), settings, variants=False, report=False)
    return units.planned


def print_plan(settings, variants: bool) -> None:
    """Every unfinished unit in run order with the projected cumulative hours."""
    units = PlannedUnits(WORK, {"valid_ppl": 0.0})
    schedule(Study(units, 2), settings, variants=False, report=False)
    measured: dict[str, list[float]] = {}
    for path in WORK.glob("*.json") if WORK.is_dir() else []:
        if not path.name.startswith("_"):
            measured.setdefault(unit_kind(path.stem), []).append(json.loads(path.read_text())["seconds"])
    planned = list(units.planned)
    extra = ["scores-tasks", "inputs-alpha"] + [f"inputs-owl-s{seed}" for seed in CALIB_SEEDS]
    for key in reversed(extra):
        if not units.done(key):
            first_use = {"scores-tasks": "-layerif", "inputs-alpha": "-alphapruning"}.get(key, f"owl-s{key[-1]}")
            at = next((i for i, k in enumerate(planned) if first_use in k), None)
            if at is not None:  # an input only the full grid uses is not planned
                planned.insert(at, key)
    total = 0.0
    for key in planned:
        kind = unit_kind(key)
        seconds = float(np.mean(measured[kind])) if kind in measured else ESTIMATES.get(kind, 1340)
        if kind == "test-wanda" and key.endswith("-s0") and key.split("-")[3] in TUNED and kind not in measured:
            seconds -= 320  # the test prune reuses the mask of its ε-selection prune
        total += seconds
        print(f"{total / 3600:6.2f} h  {key}  ({seconds:.0f} s, {'measured' if kind in measured else 'estimated'})")
    if variants:
        print(f"variants ({', '.join(VARIANTS)}) come after, at settings where LayerIF does not beat depth")


def schedule(study: Study, settings, variants: bool, report: bool = True) -> None:
    """Run every unit in priority order (ε selection runs when an allocation first needs it), seed by seed."""
    if FULL:
        study.dense_unit()
    for method, sparsity in settings:
        for round_ in range(max(len(CALIB_SEEDS), len(RANDOM_SEEDS))):
            for allocation in MAIN:
                runs = runs_of(allocation)
                if round_ < len(runs):
                    study.test_unit(method, sparsity, allocation, *runs[round_])
            if report:
                write_report(study)
    if variants:
        for method, sparsity in settings:
            if layerif_beats_depth(study, method, sparsity):
                continue
            for allocation in VARIANTS:
                for calib_seed, place_seed in runs_of(allocation):
                    study.test_unit(method, sparsity, allocation, calib_seed, place_seed)
            write_report(study)


# ---- statistics and the report ----
def records(study: Study, method: str, sparsity: float, allocation: str) -> list[dict]:
    return [r for seeds in runs_of(allocation)
            if (r := study.units.get(unit_key(method, sparsity, allocation, *seeds))) is not None]


def compare(a: list[dict], b: list[dict], seed: int = 0) -> tuple:
    """(log-ppl comparison, mean-accuracy comparison over ZS_TASKS) of A − B, seeds averaged in a resample."""
    from layerif.evaluate.stats import compare_accuracy, compare_log_perplexity

    nll_a = [r["window_nll"] for r in a]
    nll_b = [r["window_nll"] for r in b]
    ppl = compare_log_perplexity(nll_a, nll_b, a[0]["window_tokens"], seed=seed, block=BLOCK_WINDOWS)
    acc = compare_accuracy({t: [r["correct"][t] for r in a] for t in ZS_TASKS},
                           {t: [r["correct"][t] for r in b] for t in ZS_TASKS}, seed=seed)
    return ppl, acc


def window_level(a: list[dict], b: list[dict], seed: int = 0) -> tuple:
    """(log-ppl comparison with windows resampled one by one, lag-1 correlation of the window differences)."""
    from layerif.evaluate.stats import compare_log_perplexity, lag_one_correlation

    nll_a, nll_b = [r["window_nll"] for r in a], [r["window_nll"] for r in b]
    tokens = a[0]["window_tokens"]
    return compare_log_perplexity(nll_a, nll_b, tokens, seed=seed), lag_one_correlation(nll_a, nll_b, tokens)


def layerif_beats_depth(study: Study, method: str, sparsity: float) -> bool:
    ours, depth = records(study, method, sparsity, "layerif"), records(study, method, sparsity, "depth")
    if not ours or not depth:
        return True  # nothing to decide yet
    return compare(ours, depth)[0].verdict(higher_is_better=False) == "better"


def mean_acc(record: dict) -> float:
    return float(np.mean([record["acc"][t] for t in ZS_TASKS]))


def spread(values: list[float], digits: int = 1, scale: float = 1.0) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def write_report(study: Study, command: str | None = None, final: bool = False) -> None:
    """bench/results/pruning_standard.md, .csv, .png from every finished unit (partial tables included)."""

    command = command or COMMAND
    units = study.units
    dense = units.get("dense") if FULL else None
    invocations = units.log_invocation({"started": STARTED, "command": command, "state": START_STATE,
                                        "end_state": machine_state(), "report_only": REPORT_ONLY})
    lines = [f"# Pruning study — SmolLM2-135M, {'full grid' if FULL else 'standard preset'}", "",
             f"Command: `{command}`. Wall time {wall_hours(invocations):.2f} h (the invocations that ran units, "
             f"model loading included); compute time of the finished units {units.total_seconds() / 3600:.2f} h. "
             f"Machine: {describe_state(invocations)}.", ""]
    if not final:
        lines += ["**Partial tables**: the study has not finished; every number below is final for the units it "
                  "shows, missing rows are still to run.", ""]
    lines += [__doc__.split("\n\n", 1)[1].split("Sizing")[0].strip(), ""]
    if dense:
        lines += [f"Dense: test perplexity **{dense['ppl']:.2f}**, validation (ε-selection windows) perplexity "
                  f"{dense['valid_ppl']:.2f}, mean accuracy over {', '.join(ZS_TASKS)} {100 * mean_acc(dense):.2f} "
                  f"%, BoolQ {100 * dense['acc'][SIDE_TASK]:.1f} %.", ""]
    csv_rows, verdicts = [], []
    for method, sparsity in SETTINGS:
        name = setting_name(method, sparsity)
        present = [a for a in (*MAIN, *VARIANTS) if records(study, method, sparsity, a)]
        if not present:
            continue
        lines += [f"## {method} at {sparsity:.0%}", "",
                  "Perplexity and accuracy: mean over runs (min–max over calibration / placement seeds). "
                  "Δ: LayerIF S_pos minus the row, paired bootstrap (10,000 resamples), 95 % interval and p-value; "
                  "perplexity as the ratio LayerIF / row (below 1: LayerIF better), resampling runs of "
                  f"{BLOCK_WINDOWS} consecutive windows (about one article; the verdict uses this) and, for "
                  "reference, single windows as if independent (r: lag-1 correlation of consecutive windows' "
                  "differences); accuracy resamples rows.", "",
                  "| allocation | ε | runs | WikiText-2 ppl | mean acc (%) | " + " | ".join(ZS_TASKS)
                  + f" | {SIDE_TASK} (no passage) | ppl ratio LayerIF/row, {BLOCK_WINDOWS}-window runs [95 %], p "
                  "| single windows [95 %], p; r | Δ acc pts [95 %], p |",
                  "|---|---|---|---|---|" + "---|" * len(ZS_TASKS) + "---|---|---|---|"]
        ours = records(study, method, sparsity, "layerif")
        for allocation in present:
            runs = records(study, method, sparsity, allocation)
            eps = runs[0]["epsilon"]
            tasks = " | ".join(spread([r["acc"][t] for r in runs], 1, 100) for t in ZS_TASKS)
            if allocation != "layerif" and ours:
                ppl_c, acc_c = compare(ours, runs)
                single, lag = window_level(ours, runs)
                delta = f"{ppl_text(ppl_c)} | {ppl_text(single)}; r={lag:.2f} | {acc_text(acc_c)}"
                verdicts.append((method, sparsity, allocation, ppl_c, acc_c, len(ours), len(runs)))
            else:
                delta = "— | — | —"
            lines.append(f"| {allocation} | {'' if eps is None else f'{eps:g}'} | {len(runs)} | "
                         f"{spread([r['ppl'] for r in runs])} | {spread([mean_acc(r) for r in runs], 2, 100)} | "
                         f"{tasks} | {spread([r['acc'][SIDE_TASK] for r in runs], 1, 100)} | {delta} |")
            for r in runs:
                csv_rows.append({"setting": name, "method": method, "sparsity": sparsity, "allocation": allocation,
                                 "epsilon": "" if eps is None else eps, "calib_seed": r["calib_seed"],
                                 "place_seed": r["place_seed"], "ppl": r["ppl"], "mean_acc": mean_acc(r),
                                 **{f"acc_{t}": r["acc"][t] for t in (*ZS_TASKS, SIDE_TASK)},
                                 "min_ratio": min(r["block_ratios"]), "max_ratio": max(r["block_ratios"]),
                                 "clipped": " ".join(map(str, r["clipped"])), "prune_s": r["prune_s"],
                                 "eval_s": r["eval_s"]})
        lines.append("")
    lines += ["## Verdict", "", *verdict_lines(verdicts), *validation_lines(study), ""]
    lines += epsilon_appendix(study) + profile_appendix(study)
    write_tables(RESULTS, REPORT, lines, csv_rows)
    if csv_rows:
        write_plot(study)


def verdict_lines(verdicts) -> list[str]:
    """One line per comparison: better / not distinguishable / worse by the 95 % interval, then the reading."""
    if not verdicts:
        return ["No comparison has finished yet."]
    lines = []
    for method, sparsity, allocation, ppl_c, acc_c, n_ours, n_other in verdicts:
        lines.append(f"- {method} {sparsity:.0%}, LayerIF vs **{allocation}** ({n_ours} vs {n_other} runs): "
                     f"perplexity **{ppl_c.verdict(higher_is_better=False)}** ({ppl_text(ppl_c)}); "
                     f"accuracy **{acc_c.verdict(higher_is_better=True)}** ({acc_text(acc_c)}).")
    lines.append("")
    for control in ("depth", "random"):
        against = [v for v in verdicts if v[2] == control]
        if not against:
            continue
        words = [v[3].verdict(higher_is_better=False) for v in against]
        settings = ", ".join(f"{v[0]} {v[1]:.0%}" for v in against)
        if all(w == "better" for w in words):
            reading = f"LayerIF has lower perplexity than {control} at every setting run ({settings})"
        elif all(w != "better" for w in words):
            reading = f"LayerIF does **not** beat {control} on perplexity at any setting run ({settings})"
        else:
            reading = (f"LayerIF beats {control} on perplexity at {words.count('better')} of {len(words)} settings "
                       f"({settings}: {', '.join(words)})")
        accs = [v[4].verdict(higher_is_better=True) for v in against]
        lines.append(f"- Reading against {control}: {reading}; on mean accuracy the comparisons read "
                     f"{', '.join(accs)}.")
    variants = [v for v in verdicts if v[2] in VARIANTS]
    if variants:
        lines.append("- Variants (run because LayerIF did not beat depth there) are compared with LayerIF S_pos "
                     "above; a variant row with a ratio above 1 is better than S_pos.")
    return lines


def validation_lines(study: Study) -> list[str]:
    """LayerIF / depth on the ε-selection windows at each chosen ε: the same seed-0 prunes, other text."""
    lines = []
    for method, sparsity in SETTINGS:
        name = setting_name(method, sparsity)
        chosen = {}
        for allocation in ("layerif", "depth"):
            sweep = {e: r["valid_ppl"] for e in EPSILONS if (r := study.units.get(f"select-{name}-{allocation}-e{e:g}"))}
            if len(sweep) == len(EPSILONS):
                chosen[allocation] = min(sweep.items(), key=lambda item: item[1])
        ours, depth = records(study, method, sparsity, "layerif"), records(study, method, sparsity, "depth")
        if len(chosen) == 2 and ours and depth:
            (e_ours, v_ours), (e_depth, v_depth) = chosen["layerif"], chosen["depth"]
            test_ratio = ours[0]["ppl"] / depth[0]["ppl"]
            lines.append(f"- {method} {sparsity:.0%}, the same two seed-0 models on the {SELECT_WINDOWS} ε-selection "
                         f"windows of WikiText-2 valid (other articles): LayerIF (ε {e_ours:g}) {v_ours:.1f} vs depth "
                         f"(ε {e_depth:g}) {v_depth:.1f}, ratio ×{v_ours / v_depth:.3f}, against ×{test_ratio:.3f} on "
                         "the test windows." + (" The two texts rank them in opposite orders: the difference "
                                                "depends on the text more than either interval says."
                                                if (v_ours < v_depth) != (test_ratio < 1) else ""))
    return lines


def epsilon_appendix(study: Study) -> list[str]:
    lines = ["## Appendix: ε chosen on validation", "",
             f"Perplexity on the last {SELECT_WINDOWS} windows of {PPL_LENGTH} tokens of WikiText-2 valid (never "
             "drawn for calibration), calibration seed 0; the chosen ε (lowest) in bold. Test numbers above use "
             "the chosen ε only.", "",
             "| setting | allocation | " + " | ".join(f"ε {e:g}" for e in EPSILONS) + " |",
             "|---|---|" + "---|" * len(EPSILONS)]
    for method, sparsity in SETTINGS:
        for allocation in TUNED:
            values = {e: r["valid_ppl"] for e in EPSILONS if (r := study.units.get(
                f"select-{setting_name(method, sparsity)}-{allocation}-e{e:g}")) is not None}
            if not values:
                continue
            best = min(values, key=values.get) if len(values) == len(EPSILONS) else None
            cells = [("—" if e not in values else (f"**{values[e]:.1f}**" if e == best else f"{values[e]:.1f}"))
                     for e in EPSILONS]
            lines.append(f"| {method} {sparsity:.0%} | {allocation} | " + " | ".join(cells) + " |")
    return lines + [""]


def profile_appendix(study: Study) -> list[str]:
    from layerif.scores import LayerScores

    columns = {}
    for name in ("tasks", "wikitext", "tasks-attn"):
        folder = study.units.folder / f"scores-{name}"
        if (folder / "influence.safetensors").is_file():
            scores = LayerScores.load(folder)
            columns[f"{name} S_pos"] = scores.scores("S_pos")
            if name == "tasks":
                columns["tasks S_top25"] = scores.scores("S_top25")
    if (alpha := study.units.get("inputs-alpha")) is not None:
        columns["PL_Alpha_Hill"] = np.asarray(alpha["alpha"])
    if (owl := study.units.get("inputs-owl-s0")) is not None:
        columns["OWL outliers % (seed 0)"] = 100 * np.asarray(owl["outlier"])
    if not columns:
        return []
    n_blocks = len(next(iter(columns.values())))
    lines = ["## Appendix: per-block inputs", "", "| block | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for block in range(n_blocks):
        lines.append(f"| {block} | " + " | ".join(f"{values[block]:.4g}" for values in columns.values()) + " |")
    from scipy.stats import spearmanr

    # how much of a profile the depth control already carries
    rho = {name: spearmanr(values, np.arange(n_blocks)).statistic for name, values in columns.items()}
    return lines + ["", "Spearman ρ of each column with the block index: "
                    + ", ".join(f"{name} {value:+.2f}" for name, value in rho.items()) + ".", ""]


def write_plot(study: Study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerif.io import atomic_savefig

    method, sparsity = SETTINGS[0]
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for allocation in ("layerif", "layerif-top25", "depth", "alphapruning", "owl", "reversed"):
        runs = records(study, method, sparsity, allocation)
        if runs:
            axes[0].plot(runs[0]["block_ratios"], marker=".", label=allocation)
    axes[0].set_title(f"{method} {sparsity:.0%}: per-block ratios (chosen ε)")
    axes[0].set_xlabel("block")
    axes[0].legend(fontsize=7)
    labels, position = [], 0
    for method_, sparsity_ in SETTINGS:
        for allocation in (*MAIN, *VARIANTS):
            runs = records(study, method_, sparsity_, allocation)
            if not runs:
                continue
            values = [r["ppl"] for r in runs]
            axes[1].scatter([position] * len(values), values, s=12)
            labels.append(f"{setting_name(method_, sparsity_)} {allocation}")
            position += 1
    axes[1].set_yscale("log")
    axes[1].set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axes[1].set_title("WikiText-2 test perplexity, every run")
    figure.tight_layout()
    atomic_savefig(RESULTS / f"{REPORT}.png", figure)
    plt.close(figure)


STARTED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
COMMAND = "python bench/pruning.py --standard"
REPORT_ONLY = False
START_STATE: dict = {}


def shrink_for_smoke() -> None:
    """Tiny sizes that run the whole machinery in minutes (a check of the code, not a result)."""
    global SETTINGS, CALIB_SEEDS, RANDOM_SEEDS, CALIB_SEQUENCES, CALIB_LENGTH, PPL_WINDOWS, LIMIT, SELECT_WINDOWS
    global SCORE_TRAIN, SCORE_VAL, WORK, REPORT, RESULTS
    global EPSILONS
    SETTINGS, CALIB_SEEDS, RANDOM_SEEDS, EPSILONS = (("wanda", 0.7),), (0,), (0, 1), (0.1, 0.3)
    global BLOCK_WINDOWS
    CALIB_SEQUENCES, CALIB_LENGTH, PPL_WINDOWS, LIMIT, SELECT_WINDOWS, BLOCK_WINDOWS = 4, 64, 2, 3, 2, 1
    SCORE_TRAIN, SCORE_VAL = 8, 4
    WORK, REPORT = REPO / "runs" / "bench-pruning-standard-smoke", "pruning_standard_smoke"
    RESULTS = WORK  # a smoke report is not a result: it stays out of bench/results


def widen_to_full() -> None:
    """The whole grid (3 settings, 3 calibration seeds, 5 placements, every baseline, variants; ≈ 30 h here)."""
    global SETTINGS, CALIB_SEEDS, RANDOM_SEEDS, MAIN, VARIANTS, FULL, REPORT
    SETTINGS, CALIB_SEEDS, RANDOM_SEEDS, MAIN = FULL_SETTINGS, FULL_CALIB_SEEDS, FULL_RANDOM_SEEDS, FULL_MAIN
    VARIANTS = FULL_VARIANTS
    FULL, REPORT = True, "pruning_full"


def main(threads: int = 2, settings: str | None = None, variants: bool = True, report_only: bool = False,
         smoke: bool = False, model: str = "smollm2-135m", plan: bool = False, full: bool = False) -> None:
    """Run (or resume) the study and write its report (or, with `plan`, list what is left to run)."""
    if full:
        widen_to_full()
    if smoke:
        shrink_for_smoke()
    torch.set_num_threads(threads)
    START_STATE.update(machine_state())
    chosen = SETTINGS if settings is None else tuple(
        (part.split("-")[0], int(part.split("-")[1]) / 100) for part in settings.split(","))
    if plan:
        print_plan(chosen, variants)
        return
    study = Study(Units(WORK), threads, model)
    command = "python bench/pruning.py --standard" + (" --full" if full else "") + \
        (f" --settings {settings}" if settings else "") + (" --smoke" if smoke else "")
    global COMMAND, REPORT_ONLY
    COMMAND, REPORT_ONLY = command, report_only
    if not report_only:
        schedule(study, chosen, variants)
    write_report(study, command, final=chosen == SETTINGS and not unfinished(chosen))
    print(f"wrote {RESULTS / f'{REPORT}.md'}")
