"""`layerif compare moe`: LoRA-MoE fine-tuning under several expert allocations, over training seeds.

Every allocation gets the same expert budget, training rows, steps and settings; run k of every allocation
uses training seed k (adapter initialisation, row order, dropout), so the comparison is paired by seed. Each
finished unit (one adapter trained and scored on the test rows by label log-likelihood) is saved in the output
folder's checkpoint, so a run killed at any moment resumes where it stopped. Verdicts use
`two_level_accuracy` (training seeds, then test rows), the row-only interval beside it for reference.

A task can only rank allocations where the models learn more than its label prior: `beats_constant_label`
is that screen (a model's accuracy against always answering the most common label, by the interval), used
for every allocation here and for the optional validation curve (`curve_every`) that screens a task first.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from layerif.compare.units import UnitJob, allocation_tokens
from layerif.errors import LayerIFError
from layerif.outdir import OutputFolder

OUTPUTS = ("compare.json", "compare.md", "runs.csv", "row_correct.csv")
FORMAT = "layerif.compare-moe/1"
DEFAULT_ALLOCATIONS = "layerif,depth,random,uniform"
ALLOCATIONS = ("layerif", "depth", "random", "uniform", "reversed", "alphalora", "mola-2468", "mola-8642",
               "mola-5555", "plain-lora")
SCORED = ("layerif", "reversed", "random")  # allocations placed by LayerIF scores (they take :score)
# depth ramps over the scores' range (so the s^beta map sees LayerIF's spread; only the placement differs)
USES_SCORES = (*SCORED, "depth")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class MoEArm:
    """One allocation of the comparison: `base[:aggregation]`, e.g. `layerif:S_top25`."""

    token: str
    base: str
    aggregation: str = "S_pos"

    @property
    def key(self) -> str:
        return self.token.replace(":", ".")

    def run_key(self, seed: int) -> str:
        """Unit name of this allocation's run at training seed `seed`."""
        return f"run-{self.key}-s{seed}"


def parse_moe_arms(allocations: str, default_score: str) -> list[MoEArm]:
    """Allocation tokens (comma-separated) -> arms; one clear error for a bad name."""
    from layerif.scores import AGGREGATIONS

    tokens = allocation_tokens(allocations)
    arms = []
    for token in tokens:
        base, _, aggregation = token.partition(":")
        if base not in ALLOCATIONS:
            raise LayerIFError(f"unknown allocation {base!r} in --allocations; choose from {', '.join(ALLOCATIONS)}")
        if aggregation and base not in SCORED:
            raise LayerIFError(f"allocation {token!r}: only {', '.join(SCORED)} take :score")
        if aggregation and aggregation not in AGGREGATIONS:
            raise LayerIFError(f"allocation {token!r}: unknown score {aggregation!r}; choose from "
                               f"{', '.join(AGGREGATIONS)}")
        arms.append(MoEArm(token, base, aggregation or default_score))
    return arms


def constant_label(answers: list[str]) -> tuple[str, np.ndarray]:
    """The most common answer of these rows (ties: the first in sorted order) and its per-row correctness."""
    counts = Counter(str(answer) for answer in answers)
    label = min(counts, key=lambda name: (-counts[name], name))
    return label, np.array([str(answer) == label for answer in answers], dtype=np.float64)


def beats_constant_label(correct, answers: list[str], *, resamples: int = 10_000, seed: int = 0) -> dict:
    """Whether per-row correctness (rows, or seeds x rows) beats always answering the rows' most common label.

    The constant is the best one on these very rows (a model that beats it has learned more than any label
    prior); `kept` is true only when the two-level interval of the difference lies above 0.
    """
    from layerif.evaluate.stats import two_level_accuracy

    runs = np.atleast_2d(np.asarray(correct, dtype=np.float64))
    label, constant = constant_label(answers)
    versus = two_level_accuracy(runs, constant[None, :], paired=False, n_resamples=resamples, seed=seed)
    return {"kept": bool(versus.low > 0), "label": label, "constant_accuracy": float(constant.mean()),
            "accuracy": float(runs.mean()), "difference_points": 100 * versus.estimate, "lo": 100 * versus.low,
            "hi": 100 * versus.high, "p": versus.p_value, "reading": versus.verdict(higher_is_better=True)}


def choose_steps(points: list[dict]) -> int:
    """Training steps from a validation curve: the first point within one standard error of the best."""
    accuracy = np.array([np.mean(point["correct"]) for point in points])
    best = int(np.argmax(accuracy))
    standard_error = math.sqrt(accuracy[best] * (1 - accuracy[best]) / max(1, len(points[best]["correct"]) - 1))
    return int(points[int(np.flatnonzero(accuracy >= accuracy[best] - standard_error)[0])]["step"])


def plain_lora_rank(model, target_parameters: int) -> int:
    """Rank of a plain LoRA on every block projection with about `target_parameters` trainable parameters."""
    from layerif.models import select_matrices

    per_rank = sum(ref.d_in + ref.d_out for refs in select_matrices(model, "all") for ref in refs)
    return max(1, round(target_parameters / per_rank))


@dataclass
class CompareMoEJob(UnitJob):
    """Everything `layerif compare moe` needs (defaults: the study of docs/compare.md)."""

    model: str
    task: str  # a folder with train.jsonl, validation.jsonl (for scores and the curve) and test.jsonl
    out: str
    allocations: str = DEFAULT_ALLOCATIONS
    seeds: int = 3
    steps: int = 60
    budget: int | None = None  # total experts; default 5 per layer
    beta: float = 2.5
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    modules: str = "all"
    lr: float = 3e-4
    batch_size: int = 8
    micro_batch_size: int | None = None
    max_memory: str | None = None
    cutoff: int = 256
    train_on_inputs: bool = False  # loss on the answer tokens only
    n_train: int | None = None  # first rows of train.jsonl (default all)
    n_test: int | None = 500  # first rows of test.jsonl (None: all)
    scores: str | None = None  # a `layerif score` run; default: score the task's own train x validation rows
    score_name: str = "S_pos"
    score_train: int = 300
    score_val: int = 50
    curve_every: int | None = None  # validation accuracy of the uniform MoE (seed 0) every N steps, first
    n_val: int = 200
    screen_only: bool = False  # stop after the curve (needs curve_every)
    base: bool = True  # also score the base model on the test rows
    resamples: int = 10_000
    eval_batch_size: int = 16
    units: str | None = None
    dtype: str | None = None
    device: str | None = None
    quiet: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    on_unit: Callable | None = field(default=None, repr=False)

    # ---- checks before anything is loaded ----
    def validate(self) -> OutputFolder:
        """Check every argument that can be checked without the model; the checked --out folder."""
        from layerif.allocate.jobs import check_aggregation, check_model_argument, check_scores_folder
        from layerif.data import load_rows
        from layerif.evaluate.labels import label_set
        from layerif.models.load import check_device, resolve_dtype
        from layerif.moe import MoEConfig
        from layerif.moe.train import TrainConfig

        check_aggregation(self.score_name)
        self.arms = parse_moe_arms(self.allocations, self.score_name)
        for name, value, least in (("--seeds", self.seeds, 1), ("--steps", self.steps, 1),
                                   ("--top-k", self.top_k, 1), ("--rank", self.rank, 1),
                                   ("--batch-size", self.batch_size, 1), ("--cutoff", self.cutoff, 2),
                                   ("--score-train", self.score_train, 1), ("--score-val", self.score_val, 1),
                                   ("--n-val", self.n_val, 2), ("--resamples", self.resamples, 100),
                                   ("--eval-batch-size", self.eval_batch_size, 1)):
            if not isinstance(value, int) or value < least:
                raise LayerIFError(f"{name} must be an integer >= {least}, got {value}")
        for name, value, least in (("--budget", self.budget, 1), ("--n-train", self.n_train, 1),
                                   ("--n-test", self.n_test, 2), ("--curve-every", self.curve_every, 1),
                                   ("--micro-batch-size", self.micro_batch_size, 1)):
            if value is not None and (not isinstance(value, int) or value < least):
                raise LayerIFError(f"{name} must be an integer >= {least}, got {value}")
        for name, value in (("--lr", self.lr), ("--alpha", self.alpha), ("--beta", self.beta)):
            if not (math.isfinite(value) and value > 0):
                raise LayerIFError(f"{name} must be a finite number > 0, got {value}")
        if self.screen_only and self.curve_every is None:
            raise LayerIFError("--screen-only needs --curve-every (the validation curve is the screen)")
        MoEConfig(counts=[1], top_k=[1], rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                  modules=self.modules)  # its own checks (dropout, modules)
        TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size, micro_batch_size=self.micro_batch_size,
                    max_memory=self.max_memory, cutoff=self.cutoff)
        if self.max_memory is not None:
            from layerif.sizes import parse_bytes

            parse_bytes(self.max_memory)
        task = Path(self.task)
        if not task.is_dir():
            raise LayerIFError(f"--task {self.task}: not a folder (it holds train.jsonl, validation.jsonl, test.jsonl)")
        scored = any(arm.base in USES_SCORES for arm in self.arms) and self.scores is None
        needed = ["train", "test"] + (["validation"] if scored or self.curve_every else [])
        for split in needed:
            if not (task / f"{split}.jsonl").is_file():
                raise LayerIFError(f"--task {self.task} has no {split}.jsonl")
        self._rows = {split: load_rows(task / f"{split}.jsonl", quiet=True) for split in needed}
        for split in ("train", "test") + (("validation",) if self.curve_every else ()):
            missing = sum(row.get("answer") in (None, "") for row in self._rows[split])
            if missing:
                raise LayerIFError(f"--task {self.task}: {missing} {split} row(s) have no `answer` field")
        self.labels = label_set(self._rows["train"] + self._rows["test"])
        for flag, n, split in (("--n-train", self.n_train, "train"), ("--n-test", self.n_test, "test")):
            if n is not None and n > len(self._rows[split]):
                raise LayerIFError(f"{flag} {n}: {split}.jsonl has only {len(self._rows[split])} rows")
        check_scores_folder(self.scores)
        if self.units is not None and (Path(self.units).is_symlink() or Path(self.units).is_file()):
            raise LayerIFError(f"--units {self.units} is a link or a file; give a real folder")
        resolve_dtype(self.dtype)
        check_device(self.device)
        check_model_argument(self.model, self.trust_remote_code)
        folder = OutputFolder(self.out, "compare moe", overwrite=self.overwrite, inputs=[self.model],
                              names=OUTPUTS, checkpoint=True)
        folder.check()
        return folder

    # ---- UnitJob hooks ----
    def load(self):
        from layerif.models import load_model

        return load_model(self.model, dtype=self.dtype, device=self.device, quiet=self.quiet,
                          trust_remote_code=self.trust_remote_code)

    def prepare(self) -> None:
        from layerif.models import find_blocks

        self.n_layers = len(find_blocks(self._loaded.model)[1])
        self.total_experts = self.budget if self.budget is not None else 5 * self.n_layers
        if self.total_experts < self.n_layers:
            raise LayerIFError(f"--budget {self.total_experts} is below the {self.n_layers} blocks of the model "
                               "(every block needs at least one expert)")
        train = self._rows["train"]
        self.train_rows = train[: self.n_train] if self.n_train else list(train)
        self.test_rows = self._rows["test"][: self.n_test] if self.n_test else list(self._rows["test"])
        self.val_rows = self._rows.get("validation", [])[: self.n_val]

    def progress_label(self) -> str:
        return f"compare moe {Path(self.task).name}"

    def fingerprint(self) -> dict:
        """What decides every unit's numbers (allocations and seeds only decide which units run)."""
        from layerif.data.loading import file_sha256

        task = Path(self.task)
        scores = (file_sha256(Path(self.scores) / "influence.safetensors") if self.scores
                  else {"train": self.score_train, "val": self.score_val})
        return {"format": FORMAT, "model": self._loaded.source, "dtype": str(self._dtype()),
                "task": {split: file_sha256(task / f"{split}.jsonl") for split in SPLITS
                         if (task / f"{split}.jsonl").is_file()},
                "steps": self.steps, "budget": self.total_experts, "beta": self.beta, "top_k": self.top_k,
                "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "modules": self.modules,
                "lr": self.lr, "batch_size": self.batch_size, "cutoff": self.cutoff,
                "train_on_inputs": self.train_on_inputs, "n_train": self.n_train, "n_test": self.n_test,
                "scores": scores, "n_val": self.n_val, "labels": self.labels}

    def schedule(self) -> list[tuple[str, Callable, None]]:
        """Every unit in run order: inputs, the curve, the base model, then seed by seed every allocation (a
        stopped run has every allocation at its first seeds)."""
        units: list[tuple[str, Callable, None]] = []
        if self.curve_every is not None:
            units.append((self.curve_key(), self._curve_unit, None))
            if self.screen_only:
                return units
        if any(arm.base in USES_SCORES for arm in self.arms) and self.scores is None:
            units.append(("scores", self._scores_unit, None))
        if any(arm.base == "alphalora" for arm in self.arms):
            units.append(("alphas", self._alphas_unit, None))
        if self.base:
            units.append(("base", self._base_unit, None))
        units += [(arm.run_key(seed), self._run_thunk(arm, seed), None) for seed in range(self.seeds)
                  for arm in self.arms]
        return units

    def collect(self) -> MoECompareResult:
        """The result from the units finished so far."""
        return collect_moe(self)

    def write_outputs(self, result: MoECompareResult, folder: Path) -> None:
        write_moe_outputs(result, folder)

    # ---- units ----
    def curve_key(self) -> str:
        return f"curve-e{self.curve_every}"

    def _dtype(self):
        return next(self._loaded.model.parameters()).dtype

    def _correct(self, model, rows: list[dict]) -> torch.Tensor:
        from layerif.evaluate.labels import loglik_accuracy

        result = loglik_accuracy(model, self._loaded.tokenizer, rows, labels=self.labels,
                                 batch_size=self.eval_batch_size, quiet=True)
        return torch.tensor([p == str(row["answer"]) for p, row in zip(result.predictions, rows, strict=True)],
                            dtype=torch.uint8)

    def layer_scores(self, aggregation: str) -> np.ndarray:
        if self.scores is not None:
            from layerif.scores import LayerScores

            return np.asarray(LayerScores.load(self.scores).scores(aggregation), dtype=np.float64)
        return np.asarray(self.store.get("scores")[0]["scores"][aggregation], dtype=np.float64)

    def _scores_unit(self):
        from layerif.api import ScoreConfig, score_layers
        from layerif.scores import AGGREGATIONS

        loaded = self._loaded
        result = score_layers(loaded.model, loaded.tokenizer, self._rows["train"], self._rows["validation"],
                              ScoreConfig(n_train=self.score_train, n_val=self.score_val, quiet=True))
        return {"kind": "scores", "scores": {name: np.asarray(result.scores(name)).tolist()
                                             for name in AGGREGATIONS}}, {}

    def _alphas_unit(self):
        from layerif.allocate.experts import model_alphas

        return {"kind": "alphas", "alphas": model_alphas(self._loaded.model).tolist()}, {}

    def _base_unit(self):
        return {"kind": "base"}, {"correct": self._correct(self._loaded.model, self.test_rows)}

    def allocation(self, arm: MoEArm, seed: int):
        """(ExpertAllocation, extra MoE options) of an allocation at the job's budget."""
        from layerif.allocate.experts import ExpertAllocation, allocate_experts, uniform_counts

        n, budget = self.n_layers, self.total_experts
        if arm.base == "plain-lora":
            from layerif.moe import MoEConfig, expected_parameters

            reference = MoEConfig(counts=uniform_counts(n, budget).tolist(), top_k=self.top_k, rank=self.rank,
                                  modules=self.modules)
            rank = plain_lora_rank(self._loaded.model, expected_parameters(self._loaded.model, reference))
            return ExpertAllocation("plain-lora", [1] * n, [1] * n), {"rank": rank,
                                                                      "alpha": self.alpha / self.rank * rank}
        scores = self.layer_scores(arm.aggregation) if arm.base in USES_SCORES else None
        alphas = self.store.get("alphas")[0]["alphas"] if arm.base == "alphalora" else None
        return allocate_experts(arm.base, n, budget, scores=scores, beta=self.beta, top_k=self.top_k,
                                alphas=alphas, seed=seed), {}

    def train(self, arm: MoEArm, seed: int, on_step: Callable[[int, torch.nn.Module], None] | None = None):
        """A copy of the base model with `arm`'s LoRA-MoE trained at `seed` -> (model, allocation, log);
        `on_step(step, model)` runs after every optimizer step."""
        from layerif.moe import MoEConfig, TrainConfig, inject_moe, train_moe

        allocation, options = self.allocation(arm, seed)
        model = copy.deepcopy(self._loaded.model)
        settings = {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "modules": self.modules,
                    **options}
        inject_moe(model, MoEConfig(counts=allocation.counts, top_k=allocation.top_k, **settings), seed=seed)
        config = TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                             micro_batch_size=self.micro_batch_size, max_memory=self.max_memory, cutoff=self.cutoff,
                             train_on_inputs=self.train_on_inputs, seed=seed)
        log = train_moe(model, self._loaded.tokenizer, self.train_rows, config, quiet=True,
                        on_step=None if on_step is None else (lambda step: on_step(step, model)))
        return model, allocation, log

    def _run_thunk(self, arm: MoEArm, seed: int) -> Callable:
        def compute():
            import time

            model, allocation, log = self.train(arm, seed)
            started = time.perf_counter()
            correct = self._correct(model, self.test_rows)
            return ({"kind": "run", "allocation": arm.token, "seed": seed, "counts": allocation.counts,
                     "top_k": allocation.top_k, "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                                            if p.requires_grad),
                     "steps": log["steps"], "final_loss": log["final_loss"], "train_s": log["seconds"],
                     "eval_s": time.perf_counter() - started, "micro_batch_size": log["micro_batch_size"]},
                    {"correct": correct})

        return compute

    def _curve_unit(self):
        points: list[dict] = []

        def evaluate(step: int, model) -> None:
            if step % self.curve_every == 0 or step == self.steps:
                points.append({"step": step, "correct": self._correct(model, self.val_rows).tolist()})

        self.train(MoEArm("uniform", "uniform"), 0, on_step=evaluate)
        base = self._correct(self._loaded.model, self.val_rows).tolist()
        return {"kind": "curve", "base": base, "points": points}, {}


@dataclass
class MoECompareResult:
    """What `layerif compare moe` found: settings, per-run records, verdicts, the screen (partial while running)."""

    setting: dict
    arms: list[dict]
    runs: list[dict]
    verdicts: list[dict]
    base: dict | None = None
    constant: dict | None = None
    curve: dict | None = None
    complete: bool = False
    correct: dict = field(default_factory=dict, repr=False)  # (allocation, seed) -> 0/1 array over test rows
    seconds: float = 0.0

    def table(self):
        """One row per allocation: runs, accuracy over seeds, the verdict against the first, the screen."""
        import pandas as pd

        first = self.arms[0]["allocation"] if self.arms else None
        rows = []
        for arm in self.arms:
            accuracy = [100 * run["accuracy"] for run in self.runs if run["allocation"] == arm["allocation"]]
            verdict = next((v for v in self.verdicts if v["allocation"] == first
                            and v["baseline"] == arm["allocation"]), {})
            rows.append({"allocation": arm["allocation"], "runs": len(accuracy),
                         "accuracy": float(np.mean(accuracy)) if accuracy else math.nan,
                         f"points_{first}_minus_row": verdict.get("difference_points", math.nan),
                         "lo": verdict.get("lo", math.nan), "hi": verdict.get("hi", math.nan),
                         "p": verdict.get("p", math.nan), "reading": verdict.get("reading", ""),
                         "beats_constant": (arm.get("vs_constant") or {}).get("kept")})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "complete": self.complete, "setting": self.setting, "base": self.base,
                "constant_label": self.constant, "curve": self.curve, "allocations": self.arms, "runs": self.runs,
                "verdicts": self.verdicts, "compute_seconds": round(self.seconds, 1)}

    @classmethod
    def from_dict(cls, data: dict) -> MoECompareResult:
        """A result read back from compare.json (per-row correctness aside: that is row_correct.csv)."""
        return cls(data["setting"], data["allocations"], data["runs"], data["verdicts"], data.get("base"),
                   data.get("constant_label"), data.get("curve"), bool(data.get("complete")),
                   seconds=float(data.get("compute_seconds", 0.0)))


def collect_moe(job: CompareMoEJob) -> MoECompareResult:
    """The result from whatever units of `job` have finished (every number final for what it shows)."""
    from layerif.compare.results import pairwise
    from layerif.evaluate.stats import compare_accuracy, two_level_accuracy

    store, answers = job.store, [str(row["answer"]) for row in job.test_rows]
    seconds, runs, correct = 0.0, [], {}
    for key in ("scores", "alphas"):
        if (saved := store.get(key)) is not None:
            seconds += saved[0]["seconds"]
    curve = None
    if job.curve_every is not None and (saved := store.get(job.curve_key())) is not None:
        record = saved[0]
        seconds += record["seconds"]
        val_answers = [str(row["answer"]) for row in job.val_rows]
        points = record["points"]
        best = max(points, key=lambda point: np.mean(point["correct"]))
        curve = {"every": job.curve_every, "n_val": len(job.val_rows), "base": float(np.mean(record["base"])),
                 "points": [{"step": p["step"], "accuracy": float(np.mean(p["correct"]))} for p in points],
                 "constant_label": constant_label(val_answers)[0],
                 "constant_accuracy": float(constant_label(val_answers)[1].mean()), "best_step": best["step"],
                 "steps": choose_steps(points), "seconds": record["seconds"],
                 "screen": beats_constant_label(best["correct"], val_answers, resamples=job.resamples)}
    arms = []
    for arm in job.arms:
        mine = []
        for seed in range(job.seeds):
            if (saved := store.get(arm.run_key(seed))) is None:
                continue
            record, arrays = saved
            correct[(arm.token, seed)] = arrays["correct"].double().numpy()
            seconds += record["seconds"]
            mine.append({key: record[key] for key in ("allocation", "seed", "counts", "top_k",
                                                      "trainable_parameters", "steps", "final_loss", "train_s",
                                                      "eval_s", "micro_batch_size", "seconds")}
                        | {"accuracy": float(correct[(arm.token, seed)].mean())})
        runs += mine
        vs_constant = (beats_constant_label(np.stack([correct[(arm.token, r["seed"])] for r in mine]), answers,
                                            resamples=job.resamples) if mine else None)
        arms.append({"allocation": arm.token, "base": arm.base,
                     "score": arm.aggregation if arm.base in USES_SCORES else None,
                     "counts": mine[0]["counts"] if mine else None, "vs_constant": vs_constant})
    base = None
    if (saved := store.get("base")) is not None:
        base = {"accuracy": float(saved[1]["correct"].double().mean()), "seconds": saved[0]["seconds"]}
        seconds += saved[0]["seconds"]
    label, constant = constant_label(answers)

    def matrix(name: str) -> tuple[np.ndarray, list[int]]:
        seeds = sorted(seed for allocation, seed in correct if allocation == name)
        return (np.stack([correct[(name, seed)] for seed in seeds]) if seeds else np.empty((0, 0)), seeds)

    def judge(a: np.ndarray, b: np.ndarray, paired: bool) -> dict:
        two = two_level_accuracy(a, b, paired=paired, n_resamples=job.resamples)
        one = compare_accuracy(a, b, n_resamples=job.resamples)
        return {"measure": "accuracy difference allocation - baseline, in points", "difference_points":
                100 * two.estimate, "lo": 100 * two.low, "hi": 100 * two.high, "p": two.p_value,
                "reading": two.verdict(higher_is_better=True), "runs": [len(a), len(b)], "paired_seeds": paired,
                "dof": two.dof, "seed_share": two.seed_share,
                "one_level": {"difference_points": 100 * one.estimate, "lo": 100 * one.low, "hi": 100 * one.high,
                              "p": one.p_value, "reading": one.verdict(higher_is_better=True)}}

    verdicts = pairwise([arm.token for arm in job.arms], matrix, judge)
    setting = {"model": job._loaded.source, "task": str(job.task), "allocations": [a.token for a in job.arms],
               "seeds": job.seeds, "steps": job.steps, "budget": job.total_experts, "n_layers": job.n_layers,
               "beta": job.beta, "top_k": job.top_k, "rank": job.rank, "alpha": job.alpha, "dropout": job.dropout,
               "modules": job.modules, "lr": job.lr, "batch_size": job.batch_size, "cutoff": job.cutoff,
               "train_on_inputs": job.train_on_inputs, "n_train": len(job.train_rows),
               "n_test": len(job.test_rows), "labels": job.labels,
               "scores": job.scores or f"the task's first {job.score_train} train x {job.score_val} validation rows",
               "score": job.score_name, "resamples": job.resamples, "screen_only": job.screen_only,
               "machine": getattr(job, "_state", {})}
    expected = 0 if job.screen_only else job.seeds * len(job.arms)
    complete = len(runs) == expected and (job.curve_every is None or curve is not None)
    return MoECompareResult(setting, arms, runs, verdicts, base,
                            {"label": label, "accuracy": float(constant.mean())}, curve, complete, correct, seconds)


# ---- files ----
def points_text(v: dict) -> str:
    return f"{v['difference_points']:+.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}] points, p={v['p']:.3g}"


def moe_markdown(result: MoECompareResult, heading: str = "##") -> list[str]:
    """The comparison as markdown lines: the screen, the table, the verdicts."""
    from layerif.compare.results import PARTIAL, table_lines

    setting = result.setting
    lines = [f"{heading} {Path(setting['task']).name} — {setting['model']}", ""]
    if not result.complete:
        lines += [PARTIAL, ""]
    lines += [f"{setting['steps']} steps of {setting['batch_size']} rows (of {setting['n_train']}), "
              f"{setting['budget']} experts over {setting['n_layers']} layers (β {setting['beta']:g}, top-{setting['top_k']}, "
              f"rank {setting['rank']}), lr {setting['lr']:g}, loss on "
              f"{'the whole text' if setting['train_on_inputs'] else 'the answer tokens only'}; "
              f"{setting['n_test']} test rows, label log-likelihood.", ""]
    if result.curve:
        curve = result.curve
        screen = curve["screen"]
        lines += [f"Validation curve (uniform MoE, seed 0, {curve['n_val']} rows): base {100 * curve['base']:.1f} %, "
                  + ", ".join(f"step {p['step']}: {100 * p['accuracy']:.1f} %" for p in curve["points"])
                  + f". Constant label {screen['label']!r}: {100 * screen['constant_accuracy']:.1f} %. Best point "
                  f"(step {curve['best_step']}) minus the constant: {points_text(screen)} → "
                  f"**{'kept' if screen['kept'] else 'left out'}**; first point within one standard error of the "
                  f"best: step {curve['steps']}.", ""]
    constant = result.constant
    if result.base:
        lines += [f"Base model: {100 * result.base['accuracy']:.1f} %. ", ""]
    if not setting.get("screen_only"):
        lines += [f"Always answering {constant['label']!r}: {100 * constant['accuracy']:.1f} % of the test rows. An "
                  "allocation's runs must beat that by the interval before a difference between allocations means "
                  "more than a label prior.", ""]
    first = result.arms[0]["allocation"] if result.arms else ""
    rows = []
    for arm in result.arms:
        accuracy = [100 * r["accuracy"] for r in result.runs if r["allocation"] == arm["allocation"]]
        spread = "—" if not accuracy else f"{accuracy[0]:.1f}" if len(accuracy) == 1 else \
            f"{np.mean(accuracy):.1f} ({min(accuracy):.1f}–{max(accuracy):.1f})"
        v = next((v for v in result.verdicts if v["allocation"] == first and v["baseline"] == arm["allocation"]), None)
        cells = ["—"] * 4 if v is None else [
            points_text(v), v["reading"], f"{v['one_level']['difference_points']:+.2f} "
            f"[{v['one_level']['lo']:+.2f}, {v['one_level']['hi']:+.2f}]", f"{v['seed_share']:.2f}"]
        screen = arm.get("vs_constant")
        beats = "—" if screen is None else f"{'yes' if screen['kept'] else 'no'} ({points_text(screen)})"
        rows.append([arm["allocation"], str(len(accuracy)), spread, *cells, beats])
    if result.arms and not result.setting.get("screen_only"):
        lines += [f"Accuracy (%): mean over training seeds (min–max). Difference: {first} − row in accuracy points, "
                  "two-level bootstrap (training seeds, then test rows) t interval 95 %; the one-level row interval "
                  "(seeds' models held fixed) beside it.", ""]
        lines += table_lines(["allocation", "runs", "accuracy (%)", f"{first} − row [95 %], p (two-level)", "reading",
                              "one-level [95 %]", "seed share", "beats the constant label"], rows)
        lines += ["", "Verdicts (every allocation against every later one; above 0: the first is better):", ""]
        lines += [f"- {v['allocation']} vs {v['baseline']} ({v['runs'][0]} vs {v['runs'][1]} runs"
                  f"{', seeds paired' if v['paired_seeds'] else ''}): **{v['reading']}**, {points_text(v)}"
                  for v in result.verdicts] or ["- no comparison has finished yet"]
        if not any((arm.get("vs_constant") or {}).get("kept") for arm in result.arms if arm.get("vs_constant")):
            lines += ["", "No allocation beats the constant label here: this task does not rank allocations."]
    return lines + [""]


def write_moe_outputs(result: MoECompareResult, folder: Path) -> None:
    """compare.json, compare.md, runs.csv, row_correct.csv into `folder` (each atomically)."""
    from layerif.compare.results import csv_text
    from layerif.io import atomic_write_json, atomic_write_text

    folder = Path(folder)
    atomic_write_json(folder / "compare.json", result.to_dict())
    atomic_write_text(folder / "compare.md", "\n".join(["# layerif compare moe", "", *moe_markdown(result)]) + "\n")
    atomic_write_text(folder / "runs.csv", csv_text([{**{k: v for k, v in r.items() if k not in ("counts", "top_k")},
                                                      "counts": " ".join(map(str, r["counts"]))}
                                                     for r in result.runs]))
    atomic_write_text(folder / "row_correct.csv", csv_text(
        [{"allocation": allocation, "seed": seed, "row": i, "correct": int(value)}
         for (allocation, seed), values in result.correct.items() for i, value in enumerate(values)]))
