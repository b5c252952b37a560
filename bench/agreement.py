"""Estimator agreement on a real model: layer profiles and per-sample q from datainf / exact / identity / lissa / ekfac.

For each task, every estimator scores the same first --n-train training and --n-val validation rows of
`../shared/data/moe/<task>`. Reported: Spearman correlation between estimators of the S_pos layer profile
(over the L blocks), of the per-sample q (per block, averaged over blocks), the top-5 layers by S_pos, and
each estimator's time. LiSSA's convergence (relative change of G h over its last tenth of steps, worst
matrix) is listed too.

By default all estimators score one gradient capture (`layerif score --estimator a,b,...`): one spill-to-disk
pass, then every matrix's factors go through each estimator in turn, each estimator's step timed on its own.
A user's `layerif score --estimator X` costs about the capture plus X's step. `--separate-runs` makes one
full scoring run per estimator instead (what the first reduced-size table used). `--peer` adds kronfluence's
identity and EK-FAC (bench/agreement_peer.py; `pip install torch==2.13.0 -e ".[peer]"`) as kf-identity and
kf-ekfac rows of the same tables.

    python bench/agreement.py                                     # 300 x 50, mrpc + openbookqa (about 1.5 h on 2 cores)
    python bench/agreement.py --n-train 16 --n-val 4 --out /tmp/agreement.md     # smoke size
    python bench/agreement.py --peer --tasks mrpc --out bench/results/agreement_peer.md  # with kronfluence
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "moe"
ESTIMATORS = ("datainf", "exact", "identity", "lissa", "ekfac")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (0 when either side is constant)."""
    from scipy.stats import spearmanr

    value = spearmanr(a.double().numpy(), b.double().numpy()).statistic
    return float(value) if value == value else 0.0


def block_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(L,) per block: the largest |a - b| over the largest |a| (a, b: [L, n] q)."""
    a, b = a.double(), b.double()
    return (a - b).abs().amax(1) / a.abs().amax(1).clamp_min(torch.finfo(torch.float64).tiny)


def _worst_change(info: dict) -> float | None:
    return max((entry.get("relative_change", 0.0) for entry in info.values()), default=None)


def _convergence(info: dict) -> str | None:
    """'converged c of m, steps mean / max' for a LiSSA run's estimator_info (None for other estimators)."""
    from layerif.influence.lissa import convergence_summary

    summary = convergence_summary(info)
    if summary is None:
        return None
    plans = sorted({entry.get("plan", "factors") for entry in info.values()})
    return (f"{summary['matrices'] - summary['not_converged']} of {summary['matrices']} converged, steps "
            f"{summary['steps_mean']:.0f} / {summary['steps_max']} ({'/'.join(plans)} plan)")


def shared_capture_scores(model, tokenizer, train: list, val: list, estimators: list[str], settings: dict) -> dict:
    """Every estimator on one spilled gradient capture (`--estimator a,b,...`): q, step times, LiSSA's convergence."""
    from layerif.api import ScoreConfig, score_layers

    started = time.perf_counter()
    result = score_layers(model, tokenizer, train, val,
                          ScoreConfig(estimator=",".join(estimators), strategy="spill", quiet=True, **settings))
    run_seconds = time.perf_counter() - started
    by_estimator = result if isinstance(result, dict) else {estimators[0]: result}
    steps = {name: scores.metadata["estimator_s"] for name, scores in by_estimator.items()}
    capture = run_seconds - sum(steps.values())
    out = {name: {"q": scores.q.double(), "seconds": capture + steps[name], "influence_s": steps[name],
                  "plan": scores.metadata["plan"]["mode"],
                  "lissa_worst_change": _worst_change(scores.metadata.get("estimator_info") or {}),
                  "lissa_convergence": _convergence(scores.metadata.get("estimator_info") or {})}
           for name, scores in by_estimator.items()}
    return {"estimators": out, "run_seconds": run_seconds, "capture_seconds": capture}


def task_rows(task: str, sizes: tuple[int, int]) -> tuple[list, list]:
    """The first (n_train, n_val) training and validation rows of one task."""
    from layerif.data import load_rows

    return (load_rows(DATA / task / "train.jsonl")[:sizes[0]],
            load_rows(DATA / task / "validation.jsonl")[:sizes[1]])


def score_task_shared(model, tokenizer, task: str, estimators: list[str], sizes: tuple[int, int],
                      settings: dict) -> dict:
    """`shared_capture_scores` on the first rows of one task, with a progress line."""
    train, val = task_rows(task, sizes)
    print(f"  {task}: one capture, estimators {', '.join(estimators)} ...", flush=True)
    results = shared_capture_scores(model, tokenizer, train, val, estimators, settings)
    print(f"    {results['run_seconds']:.1f} s (capture and spill {results['capture_seconds']:.1f} s; "
          + ", ".join(f"{name} {results['estimators'][name]['influence_s']:.1f} s" for name in estimators) + ")",
          flush=True)
    return results


def score_task(model, tokenizer, task: str, estimators: list[str], sizes: tuple[int, int], settings: dict) -> dict:
    """Every estimator's LayerScores on one task, one scoring run each, with wall times and LiSSA's convergence."""
    from layerif.api import ScoreConfig, score_layers

    train, val = task_rows(task, sizes)
    out = {}
    for estimator in estimators:
        print(f"  {task}: {estimator} ...", flush=True)
        started = time.perf_counter()
        scores = score_layers(model, tokenizer, train, val,
                              ScoreConfig(estimator=estimator, quiet=True, **settings))
        seconds = time.perf_counter() - started
        out[estimator] = {"q": scores.q.double(), "seconds": seconds,
                          "influence_s": scores.metadata["timings"].get("influence_s", seconds),
                          "plan": scores.metadata["plan"]["mode"],
                          "lissa_worst_change": _worst_change(scores.metadata.get("estimator_info") or {}),
                          "lissa_convergence": _convergence(scores.metadata.get("estimator_info") or {})}
        print(f"    {seconds:.1f} s", flush=True)
    return out


def agreement_tables(task: str, results: dict) -> list[str]:
    """Markdown for one task: profile and per-sample Spearman matrices, times, top layers."""
    from layerif.scores import s_pos

    names = list(results)
    profiles = {name: s_pos(results[name]["q"]) for name in names}
    lines = [f"## {task}", "", "Spearman of S_pos layer profiles (upper) and mean per-block Spearman of per-sample q "
             "(lower):", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, a in enumerate(names):
        cells = []
        for j, b in enumerate(names):
            if i == j:
                cells.append("1")
            elif j > i:
                cells.append(f"{spearman(profiles[a], profiles[b]):.3f}")
            else:
                qa, qb = results[a]["q"], results[b]["q"]
                cells.append(f"{sum(spearman(qa[layer], qb[layer]) for layer in range(qa.shape[0])) / qa.shape[0]:.3f}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    base = results.get("identity", {}).get("influence_s")
    lines += ["", "| estimator | run time (s) | estimator step (s) | over identity (s) | plan | top-5 layers (S_pos) | "
              "LiSSA worst relative change |", "|---|---|---|---|---|---|---|"]
    notes = []
    for name in names:
        entry = results[name]
        top = torch.argsort(profiles[name], descending=True)[:5].tolist()
        extra = f"{entry['influence_s'] - base:.1f}" if base is not None else "-"
        change = "-" if entry["lissa_worst_change"] is None else f"{entry['lissa_worst_change']:.2e}"
        lines.append(f"| {name} | {entry['seconds']:.1f} | {entry['influence_s']:.1f} | {extra} | {entry['plan']} | "
                     f"{top} | {change} |")
        if entry.get("lissa_convergence"):
            notes.append(f"{name}: {entry['lissa_convergence']}.")
        namesake = name.removeprefix("kf-")
        if namesake != name and namesake in results:
            gap = block_gap(results[namesake]["q"], entry["q"])
            notes.append(f"{name} against {namesake}: largest per-block |q difference| over the block's "
                         f"largest |q|, median {gap.median():.1e}, max {gap.max():.1e}.")
    return lines + ([""] + notes if notes else []) + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="mrpc,openbookqa")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "agreement.md"))
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-agreement"),
                        help="each finished task's q per estimator is saved here; a rerun reuses it")
    parser.add_argument("--lissa-depth", type=int, default=None,
                        help="most LiSSA steps per matrix (default: the engine's, with its convergence tolerance)")
    parser.add_argument("--rerun", default="",
                        help="comma list of estimators to score again in their own capture, replacing their cached "
                             "entries (e.g. after a change of their defaults)")
    parser.add_argument("--separate-runs", action="store_true",
                        help="one full scoring run per estimator instead of one shared gradient capture")
    parser.add_argument("--peer", action="store_true",
                        help="also score with kronfluence (identity, EK-FAC) when it is installed")
    parser.add_argument("--peer-query-batch", type=int, default=10,
                        help="validation rows per kronfluence query batch (each batch is one pass over the "
                             "training rows; its preconditioned gradients take 4 bytes x parameters per row)")
    args = parser.parse_args(argv)
    tasks = [task for task in args.tasks.split(",") if task]
    missing = [task for task in tasks if not (DATA / task / "train.jsonl").is_file()]
    if missing:
        sys.exit(f"benchmark data not found for {', '.join(missing)} under {DATA}")
    from layerif.io import atomic_write_text
    from layerif.models import load_model

    loaded = load_model(args.model, quiet=True)
    command = "python bench/agreement.py " + " ".join(argv if argv is not None else sys.argv[1:])
    how = ("Each estimator is one scoring run (its own gradient capture); run time = that run." if args.separate_runs
           else "All estimators score one gradient capture (one spill-to-disk pass); estimator step = that "
                "estimator's own time on every matrix; run time = capture + step, about what `layerif score "
                "--estimator X` alone costs.")
    lines = ["# Estimator agreement", "", f"Command: `{command.strip()}` (torch threads: {torch.get_num_threads()})", "",
             f"Model {args.model}, first {args.n_train} training x {args.n_val} validation rows per task, full space, "
             f"all modules, S_pos. {how}", ""]
    estimators = args.estimators.split(",")
    settings = {"batch_size": args.batch_size, "max_memory": args.max_memory, "lissa_depth": args.lissa_depth}
    sizes = (args.n_train, args.n_val)
    work = Path(args.work)
    peer = _peer(args.peer)
    if peer is not None:
        lines += [peer.describe(args.peer_query_batch), ""]
    for task in tasks:
        saved = work / f"{task}-{args.n_train}x{args.n_val}-{'-'.join(estimators)}-lissa{args.lissa_depth or 'default'}.pt"
        if saved.is_file():
            results = torch.load(saved)
            print(f"  {task}: reusing {saved}", flush=True)
        elif args.separate_runs:
            results = {"estimators": score_task(loaded.model, loaded.tokenizer, task, estimators, sizes, settings)}
        else:
            results = score_task_shared(loaded.model, loaded.tokenizer, task, estimators, sizes, settings)
        rerun = [name for name in args.rerun.split(",") if name]
        if rerun:
            again = score_task_shared(loaded.model, loaded.tokenizer, task, rerun, sizes, settings)
            results["estimators"] |= again["estimators"]
            results["reruns"] = results.get("reruns", {}) | {
                name: (again["run_seconds"], again["capture_seconds"]) for name in rerun}
        if rerun or not saved.is_file():
            work.mkdir(parents=True, exist_ok=True)
            torch.save(results, saved.with_suffix(".tmp"))
            saved.with_suffix(".tmp").replace(saved)
        estimators_here = dict(results["estimators"])
        if peer is not None:
            estimators_here |= peer.cached_entries(loaded.model, loaded.tokenizer, task_rows(task, sizes), settings,
                                                   args.peer_query_batch, work / f"{task}-{args.n_train}x{args.n_val}")
        lines += agreement_tables(task, estimators_here)
        if "capture_seconds" in results:
            lines[-1:-1] = ["", f"One run: {results['run_seconds']:.1f} s, of which capture and spill "
                            f"{results['capture_seconds']:.1f} s."] + [
                f"{name}: scored again in its own capture ({seconds:.1f} s, of which capture and spill "
                f"{capture:.1f} s); its run time is that run's." for name, (seconds, capture) in
                results.get("reruns", {}).items()]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), "\n".join(lines))  # a finished task is kept if a later one fails
    print("\n".join(lines))
    return 0


def _peer(wanted: bool):
    """bench/agreement_peer.py when --peer is given and kronfluence imports; else None (saying why, on one line)."""
    if not wanted:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import agreement_peer

    why = agreement_peer.kronfluence_missing()
    if why is not None:
        print(f"--peer: kronfluence not used ({why}); install it with: pip install torch==2.13.0 -e \".[peer]\"",
              flush=True)
        return None
    return agreement_peer


if __name__ == "__main__":
    raise SystemExit(main())
