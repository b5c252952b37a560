"""A comparison's result from its finished units: per-run rows, ε sweeps, verdicts, and the files of --out.

Shared by the compare jobs: `pairwise` (every allocation against every later one), `table_lines` and
`csv_text`; the rest is `layerif compare prune`'s (the MoE job's own result is in `layerif.compare.moe`).

Verdicts compare every allocation with every later one in the --allocations list (the first, usually LayerIF,
against all others). The interval is `two_level_log_perplexity` (seeds, then article blocks of windows); the
single-level block interval, which treats the seeds' models as fixed, is kept beside it for reference.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from layerif.errors import LayerIFError
from layerif.io import atomic_write_json, atomic_write_text

FORMAT = "layerif.compare/1"


@dataclass
class CompareResult:
    """What `layerif compare prune` found: settings, per-run records, sweeps, verdicts (partial while running)."""

    setting: dict
    arms: list[dict]
    runs: list[dict]
    verdicts: list[dict]
    dense: dict | None = None
    complete: bool = False
    windows: dict = field(default_factory=dict, repr=False)  # (allocation, calib, place, split) -> nll array
    seconds: float = 0.0
    zeroshot: dict | None = None  # --zeroshot: {"tasks", "limit", "rows" (one per allocation + dense), "verdicts"}

    def table(self):
        """One row per allocation: ε, runs, test perplexity over seeds, and the verdict against the first."""
        import pandas as pd

        first = self.arms[0]["allocation"] if self.arms else None
        rows = []
        for arm in self.arms:
            ppl = [run["test_ppl"] for run in self.runs if run["allocation"] == arm["allocation"]]
            verdict = next((v for v in self.verdicts if v["allocation"] == first
                            and v["baseline"] == arm["allocation"]), None)
            rows.append({"allocation": arm["allocation"], "epsilon": arm["epsilon"], "runs": len(ppl),
                         "test_ppl": float(np.mean(ppl)) if ppl else math.nan,
                         "test_ppl_min": min(ppl) if ppl else math.nan, "test_ppl_max": max(ppl) if ppl else math.nan,
                         "valid_ppl": arm["valid_ppl"],
                         f"ratio_{first}": verdict["ratio"] if verdict else math.nan,
                         "lo": verdict["lo"] if verdict else math.nan, "hi": verdict["hi"] if verdict else math.nan,
                         "p": verdict["p"] if verdict else math.nan, "reading": verdict["reading"] if verdict else ""})
        return pd.DataFrame(rows)

    @classmethod
    def from_dict(cls, data: dict) -> CompareResult:
        """A result read back from compare.json (per-window NLL aside: that is window_nll.csv)."""
        return cls(data["setting"], data["allocations"], data["runs"], data["verdicts"], data.get("dense"),
                   bool(data.get("complete")), seconds=float(data.get("compute_seconds", 0.0)),
                   zeroshot=data.get("zeroshot"))

    def to_dict(self) -> dict:
        return {"format": FORMAT, "complete": self.complete, "setting": self.setting, "dense": self.dense,
                "allocations": self.arms, "runs": self.runs, "verdicts": self.verdicts,
                "compute_seconds": round(self.seconds, 1), "zeroshot": self.zeroshot}


def at_grid_edge(epsilon: float | None, grid) -> bool:
    """Whether a sweep over `grid` (three values or more) chose its smallest or largest ε: the best may lie beyond."""
    return epsilon is not None and len(grid) >= 3 and epsilon in (min(grid), max(grid))


def edge_text(result: CompareResult) -> str | None:
    """One line naming the allocations whose ε sits at an end of the grid, or None."""
    grid = result.setting.get("epsilon_grid", [])
    # from the sweep itself, so a compare.json written before the flag existed reads the same
    names = [arm["allocation"] for arm in result.arms if arm.get("epsilon_from") == arm["allocation"]
             and len(arm.get("sweep") or {}) == len(grid) and at_grid_edge(arm["epsilon"], grid)]
    if not names:
        return None
    return (f"ε chosen at an end of the grid for {', '.join(names)}: the best may lie beyond it. A wider "
            "--epsilon-grid reuses every finished unit and redoes only the runs whose choice moves.")


def _log_ppl(nll: np.ndarray, length: int) -> float:
    return float(nll.sum()) / (nll.size * (length - 1))


def collect(job) -> CompareResult:
    """The result from whatever units of `job` have finished (every number final for what it shows)."""
    store, length = job.store, job.window_length
    seconds = 0.0
    arms, runs, windows = [], [], {}
    for arm in job.arms:
        source = job.epsilon_source(arm)
        sweep = {}
        if source is not None:
            for eps in job.epsilons:
                if (saved := job.current(source, source.select_key(eps))) is not None:
                    sweep[f"{eps:g}"] = math.exp(saved[0]["valid_log_ppl"])
                    seconds += saved[0]["seconds"] if source == arm else 0.0
        epsilon = job.chosen_epsilon(arm)
        swept_here = source == arm and len(sweep) == len(job.epsilons)
        arms.append({"allocation": arm.token, "base": arm.base, "score": arm.aggregation if arm.uses_scores else None,
                     "scores": job.score_runs.get(arm.scores_label) if arm.uses_scores else None,
                     "epsilon": epsilon, "epsilon_from": None if source is None else source.token,
                     "valid_ppl": sweep.get(f"{epsilon:g}") if epsilon is not None else None, "sweep": sweep,
                     "epsilon_at_edge": swept_here and at_grid_edge(epsilon, job.epsilons)})
        for calib_seed, place_seed in job.runs_of(arm):
            saved = job.current_test(arm, arm.test_key(calib_seed, place_seed))
            if saved is None:
                continue
            record, arrays = saved
            nll = arrays["test_nll"].double().numpy()
            windows[(arm.token, calib_seed, place_seed, "test")] = nll
            seconds += record["seconds"]
            runs.append({"allocation": arm.token, "epsilon": record["epsilon"], "calib_seed": calib_seed,
                         "place_seed": place_seed, "test_ppl": math.exp(_log_ppl(nll, length)),
                         "measured_sparsity": record["measured_sparsity"],
                         "min_ratio": min(record["block_ratios"]), "max_ratio": max(record["block_ratios"]),
                         "block_ratios": record["block_ratios"], "clipped": record["clipped"],
                         "mask_reused": record["mask_reused"], "seconds": record["seconds"],
                         "prune_s": record.get("prune_s"), "eval_s": record.get("eval_s")})
    dense = None
    if (saved := store.get("dense")) is not None:
        test, valid = saved[1]["test_nll"].double().numpy(), saved[1]["valid_nll"].double().numpy()
        windows[("dense", -1, -1, "test")], windows[("dense", -1, -1, "valid")] = test, valid
        dense = {"test_ppl": math.exp(_log_ppl(test, length)), "valid_ppl": math.exp(_log_ppl(valid, length)),
                 "seconds": saved[0]["seconds"]}
        seconds += saved[0]["seconds"]
    setting = {"model": job._loaded.source, "method": job.method, "sparsity": job.sparsity, "calib": str(job.calib),
               "test": str(job.test), "valid": str(job.valid) if job.valid else f"last {job.valid_windows} windows "
               "of --calib (never drawn for calibration)", "calib_seeds": job.calib_seeds,
               "random_seeds": job.random_seeds, "epsilon_grid": list(job.epsilons),
               "valid_windows": job.valid_windows, "test_windows": job.test_windows,
               "window_length": job.window_length, "calib_sequences": job.calib_sequences,
               "calib_length": job.calib_length, "block_windows": job.block_windows, "resamples": job.resamples,
               "machine": getattr(job, "_state", {})}
    verdicts = verdicts_of(arms, runs, windows, length, job.block_windows, job.resamples)
    expected = sum(len(job.runs_of(arm)) for arm in job.arms)
    zeroshot, zeroshot_seconds, zeroshot_done = collect_zeroshot(job)
    return CompareResult(setting, arms, runs, verdicts, dense, complete=len(runs) == expected and zeroshot_done,
                         windows=windows, seconds=seconds + zeroshot_seconds, zeroshot=zeroshot)


def collect_zeroshot(job) -> tuple[dict | None, float, bool]:
    """(zero-shot section, its compute seconds, whether every zero-shot unit has finished) of a --zeroshot job.

    One row per allocation (its first test run's model) and the dense model; verdicts of the first allocation
    against each other one: paired bootstrap over rows of the mean accuracy over tasks (one calibration seed,
    so this interval does not see seed variance; the perplexity verdicts do).
    """
    from layerif.evaluate.stats import compare_accuracy

    if not getattr(job, "_zeroshot_tasks", None):
        return None, 0.0, True
    subjects = [*job.arms, None] if job.dense else list(job.arms)
    rows, correct, seconds = [], {}, 0.0
    for arm in subjects:
        saved = job.current_zeroshot(arm)
        if saved is None:
            continue
        record, arrays = saved
        name = record["allocation"]
        correct[name] = {task: arrays[f"correct//{task}"].double().numpy() for task in record["tasks"]}
        seconds += record["seconds"]
        rows.append({"allocation": name, "epsilon": record.get("epsilon"), "calib_seed": record.get("calib_seed"),
                     "place_seed": record.get("place_seed"), "mean_acc": record["mean_acc"],
                     "mean_acc_stderr": record["mean_acc_stderr"], "tasks": record["tasks"],
                     "seconds": record["seconds"]})
    first = job.arms[0].token
    verdicts = []
    for row in rows:
        if first in correct and row["allocation"] not in (first, "dense"):
            cmp = compare_accuracy(correct[first], correct[row["allocation"]], n_resamples=job.resamples)
            verdicts.append({"allocation": first, "baseline": row["allocation"], "difference": cmp.estimate,
                             "lo": cmp.low, "hi": cmp.high, "p": cmp.p_value,
                             "reading": cmp.verdict(higher_is_better=True)})
    section = {"tasks": [name for name, _ in job._zeroshot_tasks], "limit": job.zeroshot_limit, "rows": rows,
               "verdicts": verdicts}
    return section, seconds, len(rows) == len(subjects)


def pairwise(names: list[str], runs_of: Callable[[str], tuple[np.ndarray, list[int]]],
             judge: Callable[[np.ndarray, np.ndarray, bool], dict]) -> list[dict]:
    """Every allocation against every later one where both have runs (shared by the compare jobs).

    `runs_of(name)` gives (seeds x items values, the seed of each run); `judge(a, b, paired)` the verdict's
    numbers, `paired` being whether run k of both used seed k.
    """
    verdicts = []
    for i, first in enumerate(names):
        values_a, seeds_a = runs_of(first)
        for second in names[i + 1 :]:
            values_b, seeds_b = runs_of(second)
            if seeds_a and seeds_b:
                verdicts.append({"allocation": first, "baseline": second,
                                 **judge(values_a, values_b, seeds_a == seeds_b)})
    return verdicts


def verdicts_of(arms: list[dict], runs: list[dict], windows: dict, length: int, block: int,
                resamples: int) -> list[dict]:
    """Every allocation against every later one, where both have runs."""
    from layerif.evaluate.stats import compare_log_perplexity, two_level_log_perplexity

    def matrix(name: str) -> tuple[np.ndarray, list[int]]:
        mine = sorted((r for r in runs if r["allocation"] == name), key=lambda r: (r["calib_seed"], r["place_seed"]))
        return (np.stack([windows[(name, r["calib_seed"], r["place_seed"], "test")] for r in mine]) if mine
                else np.empty((0, 0)), [r["calib_seed"] for r in mine])

    def judge(nll_a: np.ndarray, nll_b: np.ndarray, paired: bool) -> dict:
        tokens = np.full(nll_a.shape[1], length - 1.0)
        two = two_level_log_perplexity(nll_a, nll_b, tokens, block=block, paired=paired, n_resamples=resamples)
        one = compare_log_perplexity(nll_a, nll_b, tokens, block=block, n_resamples=resamples)
        return {"ratio": math.exp(two.estimate), "lo": math.exp(two.low), "hi": math.exp(two.high),
                "p": two.p_value, "reading": two.verdict(higher_is_better=False),
                "runs": [len(nll_a), len(nll_b)], "paired_seeds": paired, "dof": two.dof,
                "seed_share": two.seed_share,
                "one_level": {"ratio": math.exp(one.estimate), "lo": math.exp(one.low), "hi": math.exp(one.high),
                              "p": one.p_value, "reading": one.verdict(higher_is_better=False)}}

    return pairwise([arm["allocation"] for arm in arms], matrix, judge)


# ---- files ----
def table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV text (the first row's keys are the header)."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


PARTIAL = "**Partial**: not every run has finished; the rows shown are final, missing ones are to run."


def ratio_text(v: dict) -> str:
    return f"×{v['ratio']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}], p={v['p']:.3g}"


def markdown(result: CompareResult, heading: str = "##") -> list[str]:
    """The comparison as markdown lines: the table, the verdicts, the ε sweeps."""
    setting = result.setting
    lines = [f"{heading} {setting['method']} at {setting['sparsity']:.0%} — {setting['model']}", ""]
    if not result.complete:
        lines += [PARTIAL, ""]
    if result.dense:
        lines += [f"Dense model: test perplexity {result.dense['test_ppl']:.2f}, validation "
                  f"{result.dense['valid_ppl']:.2f}.", ""]
    first = result.arms[0]["allocation"] if result.arms else ""
    lines += [f"Test perplexity: mean over runs (min–max over seeds). Ratio: {first} / row, two-level bootstrap "
              f"(seeds, then blocks of {setting['block_windows']} windows) t interval 95 %, and the one-level "
              "block interval (seeds' models held fixed) beside it.", "",
              "| allocation | ε | runs | test ppl | valid ppl (chosen ε) | ratio [95 %], p (two-level) | reading "
              "| one-level [95 %] | seed share of variance |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in result.arms:
        ppl = [r["test_ppl"] for r in result.runs if r["allocation"] == arm["allocation"]]
        spread = "—" if not ppl else f"{ppl[0]:.2f}" if len(ppl) == 1 else \
            f"{np.mean(ppl):.2f} ({min(ppl):.2f}–{max(ppl):.2f})"
        v = next((v for v in result.verdicts if v["allocation"] == first and v["baseline"] == arm["allocation"]), None)
        valid = "—" if arm["valid_ppl"] is None else f"{arm['valid_ppl']:.2f}"
        eps = "—" if arm["epsilon"] is None else f"{arm['epsilon']:g}"
        if v is None:
            cells = "— | — | — | —"
        else:
            one = v["one_level"]
            cells = (f"{ratio_text(v)} | {v['reading']} | ×{one['ratio']:.3f} [{one['lo']:.3f}, {one['hi']:.3f}] | "
                     f"{v['seed_share']:.2f}")
        lines.append(f"| {arm['allocation']} | {eps} | {len(ppl)} | {spread} | {valid} | {cells} |")
    lines += ["", "Verdicts (every allocation against every later one; ratio below 1: the first is better):", ""]
    lines += [f"- {v['allocation']} vs {v['baseline']} ({v['runs'][0]} vs {v['runs'][1]} runs"
              f"{', seeds paired' if v['paired_seeds'] else ''}): **{v['reading']}**, {ratio_text(v)}"
              for v in result.verdicts] or ["- no comparison has finished yet"]
    swept = [arm for arm in result.arms if arm["sweep"] and arm["epsilon_from"] == arm["allocation"]]
    if swept:
        grid = setting["epsilon_grid"]
        lines += ["", "ε sweep: validation perplexity at calibration seed 0 (chosen in bold).", "",
                  "| allocation | " + " | ".join(f"ε {e:g}" for e in grid) + " |", "|---|" + "---|" * len(grid)]
        for arm in swept:
            cells = []
            for eps in grid:
                value = arm["sweep"].get(f"{eps:g}")
                text = "—" if value is None else f"{value:.2f}"
                cells.append(f"**{text}**" if arm["epsilon"] is not None and eps == arm["epsilon"] else text)
            lines.append(f"| {arm['allocation']} | " + " | ".join(cells) + " |")
        if (warning := edge_text(result)) is not None:
            lines += ["", f"**Grid edge**: {warning}"]
    return lines + zeroshot_lines(result.zeroshot) + [""]


def zeroshot_lines(section: dict | None) -> list[str]:
    """The zero-shot table and verdicts as markdown lines (nothing without --zeroshot)."""
    if not section:
        return []
    tasks = section["tasks"]
    limit = "all rows" if section["limit"] is None else f"first {section['limit']} rows"
    lines = ["", f"Zero-shot accuracy (lm-eval log-likelihood, {limit} of each task) of each allocation's first "
             "run (calibration seed 0) and the dense model; ± one standard error.", "",
             *table_lines(["allocation", *tasks, "mean"],
                          [[row["allocation"], *(f"{row['tasks'][t]['acc']:.4f} ± {row['tasks'][t]['acc_stderr']:.4f}"
                                                 for t in tasks),
                            f"{row['mean_acc']:.4f} ± {row['mean_acc_stderr']:.4f}"] for row in section["rows"]])]
    if section["verdicts"]:
        lines += ["", "Mean accuracy, first allocation − row (paired bootstrap over rows, one calibration seed):", ""]
        lines += [f"- {v['allocation']} vs {v['baseline']}: **{v['reading']}**, {accuracy_text(v)}"
                  for v in section["verdicts"]]
    return lines


def accuracy_text(v: dict) -> str:
    """A zero-shot verdict's accuracy difference and interval, in points."""
    return f"{100 * v['difference']:+.2f} points [{100 * v['lo']:+.2f}, {100 * v['hi']:+.2f}], p={v['p']:.3g}"


def run_rows(result: CompareResult) -> list[dict]:
    return [{**{k: v for k, v in r.items() if k not in ("block_ratios", "clipped")},
             "method": result.setting["method"], "sparsity": result.setting["sparsity"],
             "clipped": " ".join(map(str, r["clipped"]))} for r in result.runs]


def window_rows(result: CompareResult) -> list[dict]:
    rows = []
    for (allocation, calib_seed, place_seed, split), nll in result.windows.items():
        rows += [{"allocation": allocation, "calib_seed": calib_seed, "place_seed": place_seed, "split": split,
                  "window": i, "nll": float(value), "tokens": result.setting["window_length"] - 1}
                 for i, value in enumerate(nll)]
    return rows


def write_outputs(result: CompareResult, folder: Path) -> None:
    """compare.json, compare.md, runs.csv, window_nll.csv into `folder` (each atomically)."""
    folder = Path(folder)
    atomic_write_json(folder / "compare.json", result.to_dict())
    atomic_write_text(folder / "compare.md", "\n".join(["# layerif compare prune", "", *markdown(result)]) + "\n")
    atomic_write_text(folder / "runs.csv", csv_text(run_rows(result)))
    atomic_write_text(folder / "window_nll.csv", csv_text(window_rows(result)))


def load_compare(folder: str | Path) -> dict:
    """compare.json of a `layerif compare` folder, checked."""
    import json

    path = Path(folder) / "compare.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayerIFError(f"{path}: not a readable compare.json ({exc})") from None
    if isinstance(data, dict) and data.get("format") == "layerif.compare-moe/1":
        raise LayerIFError(f"{path} is a `layerif compare moe` comparison, which the report does not render yet; "
                           "read compare.md beside it")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("verdicts"), list):
        raise LayerIFError(f"{path} was not written by `layerif compare`")
    return data
