"""`layerif compare prune`: the same pruner and sparsity under several allocations, over calibration seeds.

Each allocation's ε is chosen from a grid by perplexity on validation windows that neither calibration nor
test ever sees; then every allocation is pruned once per calibration seed (the `random` control once per
placement seed) and scored on the test windows. Every finished unit (one pruned model, evaluated) is saved in
the output folder's checkpoint, so a run killed at any moment resumes where it stopped. The comparison itself
(two-level bootstrap over seeds and article blocks of windows) is in `layerif.compare.results`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from layerif.compare.units import UnitJob, allocation_tokens
from layerif.errors import LayerIFError
from layerif.io import file_sha256
from layerif.outdir import OutputFolder

OUTPUTS = ("compare.json", "compare.md", "runs.csv", "window_nll.csv")
DEFAULT_ALLOCATIONS = "layerif,depth,random,uniform"
DEFAULT_EPSILONS = "0.2,0.3,0.4,0.5"
TUNED = ("layerif", "reversed", "depth", "alphapruning")  # allocations with a spread ε to choose
ZERO_ONLY = ("magnitude", "wanda")  # pruners that only zero weights: a saved mask is the whole pruned model


@dataclass(frozen=True)
class Arm:
    """One allocation of the comparison: `base[:aggregation][@scores label]`, e.g. `layerif:S_top25@attn`."""

    token: str
    base: str
    aggregation: str = "S_pos"
    scores_label: str = "default"

    @property
    def uses_scores(self) -> bool:
        from layerif.allocate.sparsity import NEEDS_SCORES

        return self.base in NEEDS_SCORES

    @property
    def key(self) -> str:
        """The token as a file-name part."""
        return self.token.replace(":", ".").replace("@", "+")

    def select_key(self, epsilon: float) -> str:
        """Unit name of this allocation's validation run at `epsilon`."""
        return f"select-{self.key}-e{epsilon:g}"

    def mask_key(self, epsilon: float | None) -> str:
        """Unit name of the pruning mask this allocation's validation run saved for reuse."""
        return f"mask-{self.key}-e{epsilon:g}"

    def test_key(self, calib_seed: int, place_seed: int) -> str:
        """Unit name of one test run."""
        return f"test-{self.key}-c{calib_seed}-r{place_seed}"

    @property
    def zeroshot_key(self) -> str:
        """Unit name of the zero-shot evaluation of this allocation's first test run."""
        return f"zeroshot-{self.key}"


def parse_arms(allocations: str, default_score: str, labels: set[str]) -> list[Arm]:
    """Allocation tokens (comma-separated) -> arms; one clear error for a bad name."""
    from layerif.allocate.sparsity import ALLOCATIONS
    from layerif.scores import AGGREGATIONS

    tokens = allocation_tokens(allocations)
    arms = []
    for token in tokens:
        rest, _, label = token.partition("@")
        base, _, aggregation = rest.partition(":")
        if base not in ALLOCATIONS:
            raise LayerIFError(f"unknown allocation {base!r} in --allocations; choose from {', '.join(ALLOCATIONS)}")
        arm = Arm(token, base, aggregation or default_score, label or "default")
        if (aggregation or label) and not arm.uses_scores:
            raise LayerIFError(f"allocation {token!r}: only layerif, reversed and random take :score or @scores")
        if aggregation and aggregation not in AGGREGATIONS:
            raise LayerIFError(f"allocation {token!r}: unknown score {aggregation!r}; choose from "
                               f"{', '.join(AGGREGATIONS)}")
        if arm.uses_scores and arm.scores_label not in labels:
            need = "--scores RUN" if arm.scores_label == "default" else f"--scores {arm.scores_label}=RUN"
            raise LayerIFError(f"allocation {token!r} needs LayerIF scores: pass {need}")
        arms.append(arm)
    return arms


def parse_floats(text: str | tuple | list, what: str) -> tuple[float, ...]:
    """'0.2,0.3' -> (0.2, 0.3) with a clear error."""
    if isinstance(text, (tuple, list)):
        return tuple(float(value) for value in text)
    try:
        values = tuple(float(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise LayerIFError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise LayerIFError(f"{what} is empty")
    return values


def parse_scores(entries) -> dict[str, str]:
    """--scores RUN and --scores LABEL=RUN -> {label: run folder} ('default' for the unlabelled one)."""
    result: dict[str, str] = {}
    for entry in [entries] if isinstance(entries, str) else list(entries or ()):
        label, sep, run = str(entry).partition("=")
        label, run = (label, run) if sep and not Path(entry).exists() else ("default", entry)
        if label in result:
            raise LayerIFError(f"--scores names {label!r} twice")
        result[label] = run
    return result


@dataclass
class ComparePruneJob(UnitJob):
    """Everything `layerif compare prune` needs (sizes default to the study of docs/compare.md)."""

    model: str
    out: str
    calib: str | None = None
    test: str | None = None
    scores: tuple[str, ...] | list[str] | str = ()
    method: str = "wanda"
    sparsity: float = 0.5
    allocations: str = DEFAULT_ALLOCATIONS
    calib_seeds: int = 3
    random_seeds: int = 3
    epsilon_grid: str | tuple[float, ...] = DEFAULT_EPSILONS
    valid: str | None = None  # default: the last --valid-windows windows of --calib, never drawn for calibration
    valid_windows: int = 96
    test_windows: int = 200
    window_length: int = 512
    calib_sequences: int = 128
    calib_length: int = 512
    block_windows: int = 10
    resamples: int = 10_000
    score_name: str = "S_pos"
    dense: bool = True
    zeroshot: str | None = None  # comma list of tasks scored on each allocation's first run (and the dense model)
    data_dir: str | None = None
    zeroshot_limit: int | None = None
    zeroshot_batch_size: int = 16
    units: str | None = None  # folder keeping finished units across runs (default: --out's checkpoint, removed once published)
    batch_size: int = 8
    eval_batch_size: int = 4
    dtype: str | None = None
    device: str | None = None
    quiet: bool = False
    overwrite: bool = False
    on_unit: Callable | None = field(default=None, repr=False)  # called with the partial result after each unit

    # ---- checks before anything is loaded ----
    def output_folder(self) -> OutputFolder:
        return OutputFolder(self.out, "compare prune", overwrite=self.overwrite, inputs=[self.model], names=OUTPUTS,
                            checkpoint=True)

    def validate(self) -> OutputFolder:
        """Check every argument that can be checked without the model; the checked --out folder."""
        from layerif.allocate.sparsity import check_epsilon, check_sparsity
        from layerif.models.load import check_device, check_model_source, resolve_dtype
        from layerif.prune.run import check_method
        from layerif.scores import AGGREGATIONS

        check_method(self.method)
        check_sparsity(self.sparsity)
        if self.score_name not in AGGREGATIONS:
            raise LayerIFError(f"unknown score {self.score_name!r}; choose from {', '.join(AGGREGATIONS)}")
        self.score_runs = parse_scores(self.scores)
        self.arms = parse_arms(self.allocations, self.score_name, set(self.score_runs))
        self.epsilons = parse_floats(self.epsilon_grid, "--epsilon-grid")
        for epsilon in self.epsilons:
            check_epsilon(epsilon)
        for name, value, least in (("--calib-seeds", self.calib_seeds, 1), ("--random-seeds", self.random_seeds, 1),
                                   ("--valid-windows", self.valid_windows, 2), ("--test-windows", self.test_windows, 2),
                                   ("--window-length", self.window_length, 2), ("--calib-sequences",
                                   self.calib_sequences, 1), ("--calib-length", self.calib_length, 2),
                                   ("--block-windows", self.block_windows, 1), ("--resamples", self.resamples, 100),
                                   ("--batch-size", self.batch_size, 1), ("--eval-batch-size", self.eval_batch_size, 1)):
            if not isinstance(value, int) or value < least:
                raise LayerIFError(f"{name} must be an integer >= {least}, got {value}")
        if self.test_windows < 2 * self.block_windows:
            raise LayerIFError(f"--test-windows {self.test_windows} holds fewer than 2 blocks of --block-windows "
                               f"{self.block_windows}: nothing to resample")
        texts = {"--calib": self.calib, "--test": self.test}
        for flag, path in texts.items():
            if path is None:
                raise LayerIFError(f"{flag} is required: a text file (.txt, or JSONL/JSON/CSV rows)")
        for flag, path in {**texts, "--valid": self.valid}.items():
            if path is not None and not Path(path).is_file():
                raise LayerIFError(f"{flag} text not found: {path}")
        resolved = {flag: Path(path).resolve() for flag, path in {**texts, "--valid": self.valid}.items() if path}
        if resolved["--calib"] == resolved["--test"]:
            raise LayerIFError("--calib and --test are the same file: the test windows must be text the pruner "
                               "never saw")
        if "--valid" in resolved and resolved["--valid"] in (resolved["--calib"], resolved["--test"]):
            raise LayerIFError("--valid must be a text other than --calib and --test (omit it to hold out the end "
                               "of --calib)")
        for run in self.score_runs.values():
            if not (Path(run) / "influence.safetensors").is_file():
                raise LayerIFError(f"--scores {run}: not a `layerif score` run folder (no influence.safetensors)")
        self._zeroshot_tasks = self._check_zeroshot()
        # hashed once: staleness is asked of every zero-shot unit after each new unit
        self._zeroshot_id = {"tasks": {name: file_sha256(path) for name, path in self._zeroshot_tasks},
                             "limit": self.zeroshot_limit}
        if self.units is not None and (Path(self.units).is_symlink() or Path(self.units).is_file()):
            raise LayerIFError(f"--units {self.units} is a link or a file; give a real folder")
        resolve_dtype(self.dtype)
        check_device(self.device)
        check_model_source(self.model)
        folder = self.output_folder()
        folder.check()
        return folder

    def _check_zeroshot(self) -> list[tuple[str, Path]]:
        """The zero-shot tasks as (name, file), each file read and checked now (a bad row fails before pruning)."""
        if not self.zeroshot:
            if self.zeroshot_limit is not None or self.data_dir is not None:
                raise LayerIFError("--zeroshot-limit and --data-dir need --zeroshot TASKS")
            return []
        from layerif.evaluate.zeroshot import load_task_docs, resolve_task

        if self.zeroshot_limit is not None and (not isinstance(self.zeroshot_limit, int) or self.zeroshot_limit < 1):
            raise LayerIFError(f"--zeroshot-limit must be an integer >= 1, got {self.zeroshot_limit}")
        if not isinstance(self.zeroshot_batch_size, int) or self.zeroshot_batch_size < 1:
            raise LayerIFError(f"--zeroshot-batch-size must be an integer >= 1, got {self.zeroshot_batch_size}")
        self._zeroshot_names = [task.strip() for task in str(self.zeroshot).split(",") if task.strip()]
        tasks = [resolve_task(task, self.data_dir) for task in self._zeroshot_names]
        names = [name for name, _ in tasks]
        if not tasks or len(set(names)) != len(names):
            raise LayerIFError(f"--zeroshot must name distinct tasks, got {self.zeroshot!r}")
        for name, path in tasks:
            load_task_docs(path, name, self.zeroshot_limit)
        return tasks

    # ---- the grid ----
    def epsilon_source(self, arm: Arm) -> Arm | None:
        """The arm whose validation sweep picks `arm`'s ε (random: the LayerIF arm on the same scores)."""
        if arm.base == "random":
            twin = next((a for a in self.arms if a.base == "layerif" and a.aggregation == arm.aggregation
                         and a.scores_label == arm.scores_label), None)
            return twin or arm
        return arm if arm.base in TUNED else None

    def runs_of(self, arm: Arm) -> list[tuple[int, int]]:
        """(calibration seed, placement seed) of every test run of an arm."""
        if arm.base == "random":
            return [(seed % self.calib_seeds, seed) for seed in range(self.random_seeds)]
        return [(seed, 0) for seed in range(self.calib_seeds)]

    def schedule(self) -> list[tuple[str, Callable, Callable[[str], bool] | None]]:
        """Every unit in run order: allocation by allocation as listed, each over all its seeds (its ε sweep
        just before its first run), the dense model last; a stopped run has whole rows for the first ones.
        With --zeroshot, each allocation's first test run is followed by its zero-shot unit (the model is still
        pruned then) and the dense model's by the dense zero-shot unit.
        A unit is stale when it was made with other scores than its allocation's run folder now holds, and a
        test or zero-shot unit also when it was pruned at another ε than the sweep now chooses (a zero-shot unit
        also when the task files or the row limit changed)."""
        units: list[tuple[str, Callable, Callable[[str], bool] | None]] = []
        swept: set[str] = set()
        for arm in self.arms:
            source = self.epsilon_source(arm)
            if source is not None and source.token not in swept:
                swept.add(source.token)
                units += [(source.select_key(eps), self._select_thunk(source, eps), self._stale(source))
                          for eps in self.epsilons]
            tests = [(arm.test_key(calib_seed, place_seed), self._test_thunk(arm, calib_seed, place_seed),
                      lambda key, arm=arm: self.current_test(arm, key) is None)
                     for calib_seed, place_seed in self.runs_of(arm)]
            if self._zeroshot_tasks:
                tests.insert(1, (arm.zeroshot_key, self._zeroshot_thunk(arm),
                                 lambda key, arm=arm: self.current_zeroshot(arm) is None))
            units += tests
        if self.dense:
            units.append(("dense", self._dense_unit, None))
            if self._zeroshot_tasks:
                units.append(("zeroshot-dense", self._zeroshot_thunk(None),
                              lambda key: self.current_zeroshot(None) is None))
        return units

    def _stale(self, arm: Arm) -> Callable[[str], bool]:
        return lambda key: self.current(arm, key) is None

    # ---- running (UnitJob.run) ----
    def load(self):
        from layerif.models import load_model

        return load_model(self.model, dtype=self.dtype, device=self.device, quiet=self.quiet)

    def prepare(self) -> None:
        self._prepare_texts()
        self._dense_weights = {name: module.weight.detach().to("cpu", copy=True)
                               for name, module in self._matrices().items()}

    def progress_label(self) -> str:
        return f"compare {self.method} {self.sparsity:g}"

    def collect(self):
        """The result from the units finished so far -> CompareResult."""
        from layerif.compare.results import collect

        return collect(self)

    def write_outputs(self, result, folder: Path) -> None:
        from layerif.compare.results import write_outputs

        write_outputs(result, folder)

    def fingerprint(self) -> dict:
        """What decides every unit's numbers (allocations, seeds and the ε grid only decide which units run;
        the scores of an allocation are checked per unit, so a variant on new scores can join a folder)."""
        return {"format": "layerif.compare-prune/1", "model": self._loaded.source, "dtype": str(self._dtype()),
                "method": self.method, "sparsity": self.sparsity, "calib": file_sha256(self.calib),
                "test": file_sha256(self.test), "valid": file_sha256(self.valid) if self.valid else None,
                "valid_windows": self.valid_windows, "test_windows": self.test_windows,
                "window_length": self.window_length, "calib_sequences": self.calib_sequences,
                "calib_length": self.calib_length}

    def scores_digest(self, arm: Arm) -> dict:
        """The SHA-256 of the scores an arm uses: kept in its units' records, which are stale when it changes."""
        if not arm.uses_scores:
            return {}
        digests = self.__dict__.setdefault("_digests", {})
        if arm.scores_label not in digests:
            digests[arm.scores_label] = file_sha256(Path(self.score_runs[arm.scores_label]) / "influence.safetensors")
        return {"scores_sha256": digests[arm.scores_label]}

    def _dtype(self):
        return next(self._loaded.model.parameters()).dtype

    def _prepare_texts(self) -> None:
        from layerif.calibration import read_text, tokenize_text

        tokenizer, length = self._loaded.tokenizer, self.window_length
        calib_ids = tokenize_text(read_text(self.calib), tokenizer)
        if self.valid is None:
            held_out = self.valid_windows * length
            if len(calib_ids) - held_out <= self.calib_length:
                raise LayerIFError(f"--calib has {len(calib_ids)} tokens: too few to hold out {self.valid_windows} "
                                   f"validation windows of {length} and still draw calibration sequences of "
                                   f"{self.calib_length} (pass --valid, or fewer --valid-windows)")
            self._calib_part = calib_ids[: len(calib_ids) - held_out]
            self._valid = calib_ids[len(calib_ids) - held_out :].view(self.valid_windows, length)
        else:
            self._calib_part = calib_ids
            self._valid = _first_windows(tokenize_text(read_text(self.valid), tokenizer), self.valid_windows, length,
                                         "--valid")
        self._test = _first_windows(tokenize_text(read_text(self.test), tokenizer), self.test_windows, length, "--test")
        self._calib_cache: dict[int, torch.Tensor] = {}
        self._pruned_as: tuple | None = None

    def calibration(self, seed: int) -> torch.Tensor:
        from layerif.calibration import sample_windows

        if seed not in self._calib_cache:
            self._calib_cache[seed] = sample_windows(self._calib_part, self.calib_sequences, self.calib_length, seed,
                                                     str(self.calib))
        return self._calib_cache[seed]

    def _matrices(self) -> dict[str, torch.nn.Module]:
        from layerif.models import find_blocks, select_matrices

        model = self._loaded.model
        path, _ = find_blocks(model)
        return {f"{path}.{ref.layer}.{ref.name}": ref.module for refs in select_matrices(model, modules="all")
                for ref in refs}

    def _restore_dense(self) -> None:
        self._pruned_as = None
        with torch.no_grad():
            for name, module in self._matrices().items():
                module.weight.copy_(self._dense_weights[name])

    def _scores(self, arm: Arm):
        from layerif.scores import LayerScores

        return LayerScores.load(self.score_runs[arm.scores_label]).scores(arm.aggregation)

    def _alpha(self) -> np.ndarray:
        def compute():
            from layerif.allocate.metrics import block_alpha_hill

            self._restore_dense()
            return {"alpha": block_alpha_hill(self._loaded.model).tolist()}, {}

        return np.asarray(self.store.run("alpha", compute)[0]["alpha"])

    def _outlier(self, calib_seed: int) -> np.ndarray:
        def compute():
            from layerif.allocate.metrics import owl_outlier_ratios

            self._restore_dense()
            ratios = owl_outlier_ratios(self._loaded.model, self.calibration(calib_seed), batch_size=self.batch_size)
            return {"outlier": ratios.tolist()}, {}

        return np.asarray(self.store.run(f"owl-c{calib_seed}", compute)[0]["outlier"])

    def _allocate(self, arm: Arm, epsilon: float | None, calib_seed: int, place_seed: int):
        from layerif.allocate.sparsity import allocate_sparsity

        scores = self._scores(arm) if arm.uses_scores else None
        alpha = self._alpha() if arm.base == "alphapruning" else None
        outlier = self._outlier(calib_seed) if arm.base == "owl" else None
        self._restore_dense()
        return allocate_sparsity(self._loaded.model, arm.base, self.sparsity, scores=scores,
                                 epsilon=0.3 if epsilon is None else epsilon, alpha=alpha, outlier=outlier,
                                 seed=place_seed)

    def _prune(self, arm: Arm, epsilon: float | None, calib_seed: int, place_seed: int, mask: str | None = None):
        """Prune the dense model as `arm` says -> (allocation, measured sparsity, whether a saved mask was used)."""
        from layerif.prune import prune_model

        plan = self._allocate(arm, epsilon, calib_seed, place_seed)
        if mask is not None and (saved := self.store.get(mask)) is not None:
            measured, reused = _apply_mask(self._matrices(), saved[1]), True
        else:
            measured = prune_model(self._loaded.model, plan.matrix_ratios, self.method,
                                   self.calibration(calib_seed) if self.method != "magnitude" else None,
                                   batch_size=self.batch_size, quiet=True).overall
            reused = False
        self._pruned_as = (arm.token, epsilon, calib_seed, place_seed)  # what the model in memory now is
        return plan, measured, reused

    def _nll(self, windows: torch.Tensor) -> torch.Tensor:
        from layerif.evaluate.perplexity import window_nll

        return window_nll(self._loaded.model, windows, self.eval_batch_size, quiet=True)

    def _dense_unit(self):
        self._restore_dense()
        return {"kind": "dense"}, {"test_nll": self._nll(self._test), "valid_nll": self._nll(self._valid)}

    def _select_thunk(self, arm: Arm, epsilon: float) -> Callable:
        def compute():
            started = time.perf_counter()
            plan, measured, _ = self._prune(arm, epsilon, 0, 0)
            pruned = time.perf_counter()
            if self.method in ZERO_ONLY:  # the seed-0 test run of the chosen ε reuses this prune
                self.store.drop(arm.mask_key(epsilon))  # a mask left by a prune on other scores
                self.store.run(arm.mask_key(epsilon), lambda: ({"kind": "mask"}, _mask_of(self._matrices())))
            nll = self._nll(self._valid)
            return ({"kind": "select", **self.scores_digest(arm), "allocation": arm.token, "epsilon": epsilon,
                     "calib_seed": 0, "place_seed": 0,
                     "valid_log_ppl": float(nll.sum()) / (nll.numel() * (self.window_length - 1)),
                     "block_ratios": plan.block_ratios.tolist(), "measured_sparsity": measured,
                     "prune_s": pruned - started, "eval_s": time.perf_counter() - pruned},
                    {"valid_nll": nll})

        return compute

    def chosen_epsilon(self, arm: Arm) -> float | None:
        """The ε of the grid with the lowest validation perplexity for `arm` (its sweep must have run)."""
        source = self.epsilon_source(arm)
        if source is None:
            return None
        sweep = {eps: saved[0]["valid_log_ppl"] for eps in self.epsilons
                 if (saved := self.current(source, source.select_key(eps))) is not None}
        if len(sweep) < len(self.epsilons):
            return None
        return min(sweep, key=sweep.get)

    def current(self, arm: Arm, key: str):
        """(record, arrays) of a finished unit of `arm` made with its present scores, else None."""
        saved = self.store.get(key)
        if saved is None:
            return None
        expected = self.scores_digest(arm)
        return saved if all(saved[0].get(k) == v for k, v in expected.items()) else None

    def current_test(self, arm: Arm, key: str):
        """A finished test unit of `arm` made with its present scores at the ε its sweep now chooses, else None
        (a wider --epsilon-grid can move the choice; runs pruned at the old ε are then redone)."""
        saved = self.current(arm, key)
        return saved if saved is not None and saved[0].get("epsilon") == self.chosen_epsilon(arm) else None

    def current_zeroshot(self, arm: Arm | None):
        """The finished zero-shot unit of `arm` (None: the dense model) made from the model its first test run
        is now (same scores and chosen ε) on the same task files and row limit, else None."""
        saved = self.store.get("zeroshot-dense") if arm is None else self.current_test(arm, arm.zeroshot_key)
        return saved if saved is not None and saved[0].get("zeroshot") == self._zeroshot_id else None

    def _zeroshot_thunk(self, arm: Arm | None) -> Callable:
        def compute():
            from layerif.evaluate.zeroshot import zeroshot_accuracy

            started = time.perf_counter()
            record: dict = {"kind": "zeroshot", "zeroshot": self._zeroshot_id}
            if arm is None:
                self._restore_dense()
                record["allocation"] = "dense"
            else:
                epsilon = self.chosen_epsilon(arm)
                calib_seed, place_seed = self.runs_of(arm)[0]
                # right after the first test run the model is still pruned as that run was; after a resume it is not
                again = self._pruned_as != (arm.token, epsilon, calib_seed, place_seed)
                if again:
                    self._prune(arm, epsilon, calib_seed, place_seed)
                record.update({**self.scores_digest(arm), "allocation": arm.token, "epsilon": epsilon,
                               "calib_seed": calib_seed, "place_seed": place_seed, "pruned_again": again})
            pruned = time.perf_counter()
            result = zeroshot_accuracy(self._loaded.model, self._loaded.tokenizer,
                                       self._zeroshot_names, self.data_dir, self.zeroshot_limit, batch_size=self.zeroshot_batch_size,
                                       quiet=True)
            tasks = result["tasks"]
            record.update({"tasks": {name: {k: v for k, v in entry.items() if k not in ("correct", "correct_norm")}
                                     for name, entry in tasks.items()},
                           "mean_acc": result["mean_acc"], "mean_acc_stderr": result["mean_acc_stderr"],
                           "prune_s": pruned - started, "eval_s": time.perf_counter() - pruned})
            arrays = {f"correct//{name}": torch.tensor(entry["correct"], dtype=torch.int8)
                      for name, entry in tasks.items()}
            return record, arrays

        return compute

    def _test_thunk(self, arm: Arm, calib_seed: int, place_seed: int) -> Callable:
        def compute():
            source = self.epsilon_source(arm)
            epsilon = self.chosen_epsilon(arm)
            reuse = source is not None and source == arm and calib_seed == 0 and place_seed == 0
            mask = arm.mask_key(epsilon) if reuse and self.method in ZERO_ONLY else None
            started = time.perf_counter()
            plan, measured, reused = self._prune(arm, epsilon, calib_seed, place_seed, mask)
            pruned = time.perf_counter()
            nll = self._nll(self._test)
            evaluated = time.perf_counter()
            if source == arm and calib_seed == 0 and self.method in ZERO_ONLY:
                for eps in self.epsilons:  # masks are only kept for this reuse
                    self.store.drop(arm.mask_key(eps))
            return ({"kind": "test", **self.scores_digest(arm), "allocation": arm.token, "epsilon": epsilon, "calib_seed": calib_seed,
                     "place_seed": place_seed, "block_ratios": plan.block_ratios.tolist(),
                     "clipped": list(plan.clipped), "measured_sparsity": measured, "mask_reused": reused,
                     "prune_s": pruned - started, "eval_s": evaluated - pruned},
                    {"test_nll": nll})

        return compute


def _first_windows(ids: torch.Tensor, n_windows: int, length: int, flag: str) -> torch.Tensor:
    if len(ids) < n_windows * length:
        raise LayerIFError(f"{flag} has {len(ids)} tokens, fewer than {n_windows} windows of {length} "
                           f"({math.ceil(n_windows * length)} tokens)")
    return ids[: n_windows * length].view(n_windows, length)


def _mask_of(matrices: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The zero pattern of every matrix, bit-packed (uint8), with its shape."""
    arrays = {}
    for name, module in matrices.items():
        zero = (module.weight == 0).cpu().numpy()
        arrays[name] = torch.from_numpy(np.packbits(zero.ravel()))
        arrays[f"{name}//shape"] = torch.tensor(zero.shape)
    return arrays


def _apply_mask(matrices: dict[str, torch.nn.Module], arrays: dict[str, torch.Tensor]) -> float:
    """Zero what a saved mask marks (on the dense weights); the overall share of zeros."""
    zeros = total = 0
    with torch.no_grad():
        for name, module in matrices.items():
            shape = tuple(arrays[f"{name}//shape"].tolist())
            zero = np.unpackbits(arrays[name].numpy(), count=int(np.prod(shape))).reshape(shape).astype(bool)
            module.weight.masked_fill_(torch.from_numpy(zero).to(module.weight.device), 0.0)
            zeros, total = zeros + int(zero.sum()), total + zero.size
    return zeros / max(total, 1)
