"""Peak memory of `layerif score` under --max-memory budgets: SmolLM2-135M, 300 x 50 MRPC, full space, all modules.

For each budget: peak RSS of the scoring process (whole process, and of the scoring phase alone), the plan
it chose (factors in memory, spilled to disk, or streamed sums) and why, passes and wall time. Target:
peak RSS <= budget + model footprint + 1.5 GiB, where the model footprint is the peak RSS of a process
that only loads the model. `--compare` also runs the smallest budget with each named strategy forced,
so the planner's choice can be checked against the alternative. Writes bench/results/memory.{json,md}.

    python bench/memory.py [--budgets 1,2,4,8] [--compare stream] [--n-train 300 --n-val 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "moe" / "mrpc"
RESULTS = REPO / "bench" / "results"
GIB = 1 << 30

LOAD_ONLY = ("import resource; from layerif.models import load_model; load_model('smollm2-135m', quiet=True); "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="1,2,4,8", help="GiB, comma separated")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--compare", default="", help="strategies forced at the smallest budget, comma separated")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"benchmark data not found at {DATA}")
    done = subprocess.run([sys.executable, "-c", LOAD_ONLY], check=True, capture_output=True, text=True)
    model_bytes = int(done.stdout.strip().splitlines()[-1])
    print(f"model footprint (peak RSS of loading alone): {model_bytes / GIB:.2f} GiB", flush=True)
    rows = []
    budgets = [float(b) for b in args.budgets.split(",")]
    runs = [(budget, "auto") for budget in budgets] + [(min(budgets), s) for s in args.compare.split(",") if s]
    for budget, strategy in runs:
        out = Path(tempfile.mkdtemp(prefix="layerif-memory-")) / "run"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "layerif", "score", "--model", "smollm2-135m",
                        "--train", str(DATA / "train.jsonl"), "--val", str(DATA / "validation.jsonl"),
                        "--n-train", str(args.n_train), "--n-val", str(args.n_val), "--max-memory", f"{budget}GiB",
                        "--strategy", strategy, "--out", str(out), "--quiet"], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        record = json.loads((out / "run.json").read_text())
        shutil.rmtree(out.parent, ignore_errors=True)
        peak = record["peak_rss_bytes"]
        scoring_peak = record.get("peak_rss_scoring_bytes") or float("nan")
        limit = budget * GIB + model_bytes + 1.5 * GIB
        rows.append({"budget_gib": budget, "strategy": strategy, "peak_rss_gib": peak / GIB,
                     "scoring_peak_rss_gib": scoring_peak / GIB, "limit_gib": limit / GIB, "within": peak <= limit,
                     "mode": record["plan"]["mode"], "passes": record["passes"], "reason": record["plan"]["reason"],
                     "estimated_cost": record["plan"]["estimated_cost"], "wall_s": wall,
                     "influence_s": record["timings_s"].get("influence_s")})
        print(rows[-1], flush=True)
    summary = {"command": "python bench/memory.py " + " ".join(sys.argv[1:]), "n_train": args.n_train,
               "n_val": args.n_val, "model_footprint_gib": model_bytes / GIB, "runs": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# Memory under --max-memory — SmolLM2-135M, {args.n_train} x {args.n_val} MRPC rows, full space, all modules",
             "", f"Command: `{summary['command'].strip()}`. Model footprint (peak RSS of loading alone): "
             f"{model_bytes / GIB:.2f} GiB.", "",
             "| budget (GiB) | --strategy | peak RSS (GiB) | scoring-phase peak RSS (GiB) | limit = budget + model + 1.5 "
             "(GiB) | within | plan | passes | scoring (s) | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget_gib']:g} | {r['strategy']} | {r['peak_rss_gib']:.2f} | {r['scoring_peak_rss_gib']:.2f} "
                     f"| {r['limit_gib']:.2f} | {r['within']} | {r['mode']} | {r['passes']} | {r['influence_s']:.0f} "
                     f"| {r['wall_s']:.0f} |")
    lines += ["", "Plans:"] + [f"- {r['budget_gib']:g} GiB, {r['strategy']}: {r['reason']}; estimated costs "
                               f"{r['estimated_cost']}" for r in rows]
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
