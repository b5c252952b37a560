"""Crash and resume: runs of `layerif score` killed with SIGKILL at random moments, then re-run and compared.

A small random Llama (SmolLM2's tokenizer, built from a config; no download) scores 32 train x 8
validation MRPC rows with --max-memory 1 --strategy store (one checkpointed pass per layer), --strategy
spill (one pass to disk, then checkpointed layers) or --strategy stream (checkpointed passes), in turn.
For each run: max relative difference of q against a clean run, the seconds lost to the crash
(killed + resumed - clean), and any file left in the output directory besides the run's outputs
(a stale checkpoint or spill file would be one). Writes bench/results/resume.{json,md}.

    python bench/resume.py [--runs 10] [--seed 0] [--strategies store,spill,stream]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "moe" / "mrpc"
RESULTS = REPO / "bench" / "results"


def build_model(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerif.models import load_model

    tokenizer = load_model("smollm2-135m", quiet=True).tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def command(model: Path, out: Path, strategy: str) -> list[str]:
    extra = ["--max-memory", "1", "--strategy", "store"] if strategy == "store" else ["--strategy", strategy]
    return [sys.executable, "-m", "layerif", "score", "--model", str(model), "--train", str(DATA / "train.jsonl"),
            "--val", str(DATA / "validation.jsonl"), "--n-train", "32", "--n-val", "8", "--batch-size", "4", "--max-length", "64",
            "--out", str(out), "--quiet", *extra]


def timed_run(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default="store,spill,stream", help="taken in turn, comma separated")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"benchmark data not found at {DATA}")
    from layerif.runs import OUTPUT_FILES
    from layerif.scores import LayerScores

    strategies = tuple(args.strategies.split(","))

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="layerif-resume-"))
    build_model(root / "model")
    clean: dict[str, tuple[torch.Tensor, float]] = {}
    for strategy in strategies:
        seconds = timed_run(command(root / "model", root / f"clean-{strategy}", strategy))
        clean[strategy] = (LayerScores.load(root / f"clean-{strategy}").q, seconds)
        print(f"clean {strategy}: {seconds:.1f} s", flush=True)
    rows = []
    for run in range(args.runs):
        strategy = strategies[run % len(strategies)]
        reference, clean_s = clean[strategy]
        out = root / f"run-{run}"
        kill_at = rng.uniform(0.1, 1.0) * clean_s
        started = time.perf_counter()
        process = subprocess.Popen(command(root / "model", out, strategy), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=kill_at)
            finished_before_kill = True
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            finished_before_kill = False
        killed_s = time.perf_counter() - started
        units = sorted(p.name for p in (out / ".checkpoint").glob("*.safetensors")) if out.exists() else []
        # A run killed after it wrote run.json (while exiting) is complete: it is checked like the others.
        finished_before_kill = finished_before_kill or (out / "run.json").exists()
        resumed_s = 0.0 if finished_before_kill else timed_run(command(root / "model", out, strategy))
        record = json.loads((out / "run.json").read_text())
        q = LayerScores.load(out).q
        difference = float((q - reference).abs().max() / reference.abs().max())
        leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name not in OUTPUT_FILES)
        rows.append({"run": run, "strategy": strategy, "kill_at_s": round(kill_at, 2), "killed_after_s": round(killed_s, 2),
                     "finished_before_kill": finished_before_kill, "checkpoint_units_at_kill": len(units),
                     "resumed_units": len((record.get("resumed") or {}).get("units_loaded", [])),
                     "max_rel_diff": difference, "seconds_lost": round(killed_s + resumed_s - clean_s, 2),
                     "leftover_files": leftovers})
        print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"command": "python bench/resume.py " + " ".join(sys.argv[1:]),
               "clean_seconds": {k: v[1] for k, v in clean.items()}, "runs": rows,
               "all_equal_1e-6": all(r["max_rel_diff"] <= 1e-6 for r in rows),
               "no_leftover_files": not any(r["leftover_files"] for r in rows)}
    (RESULTS / "resume.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# Resume after SIGKILL", "", f"Command: `{summary['command'].strip()}`", "",
             "Clean runs: " + ", ".join(f"{k} {v[1]:.1f} s" for k, v in clean.items())
             + " (6-layer random Llama with SmolLM2's tokenizer, 32 x 8 MRPC rows, 64 tokens).", "",
             "| run | strategy | killed after (s) | checkpoint units at kill | units reused | max rel diff vs clean | "
             "seconds lost | files left besides outputs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        killed = "finished first" if r["finished_before_kill"] else f"{r['killed_after_s']:.1f}"
        lines.append(f"| {r['run']} | {r['strategy']} | {killed} | {r['checkpoint_units_at_kill']} | "
                     f"{r['resumed_units']} | {r['max_rel_diff']:.1e} | {r['seconds_lost']:.1f} | "
                     f"{len(r['leftover_files'])} |")
    lines += ["", f"All runs equal to the clean run within 1e-6: **{summary['all_equal_1e-6']}**; "
              f"no files left besides the outputs: **{summary['no_leftover_files']}**."]
    (RESULTS / "resume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
