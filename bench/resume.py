"""Crash and resume: runs of `layerif score` killed with SIGKILL at random moments, then re-run and compared.

A small random Llama (SmolLM2's tokenizer, built from a config; no download) scores 32 train x 8
validation MRPC rows with --max-memory 1 --strategy store (one checkpointed pass per layer), --strategy
spill (one pass to disk, then checkpointed layers) or --strategy stream (checkpointed passes), in turn.
For each run: max relative difference of q against a clean run, the seconds lost to the crash
(killed + resumed - clean), and any file left in the output directory besides the run's outputs
(a stale checkpoint or spill file would be one).

Then a publish is killed at chosen instants: a spill run over a finished earlier run (--overwrite) SIGKILLs
itself just before or just after its k-th write / fsync / rename (the publish's last renames, the folder
exchange among them, both before and after; the other instants sampled). Afterwards --out must hold the complete old run (byte for byte) or the complete
new one, and the same command must then finish with scores equal to the clean run's.
Writes bench/results/resume.{json,md}.

    python bench/resume.py [--runs 30] [--publish-kills 30] [--seed 0] [--strategies store,spill,stream]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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
PUBLISH_RENAMES = 8  # renames at the end of a run that are killed both before and after


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


def child(kill_at: int, when: str, count_file: str, argv: list[str]) -> None:
    """Run `layerif argv` in this process, SIGKILLing it before/after I/O call `kill_at` (0: count the calls)."""
    import layerif.gradients.spill as spill
    import layerif.io as io
    from layerif.cli import main as cli_main

    calls = []

    def wrap(module, name: str, label: str) -> None:
        real = getattr(module, name)

        def counted(*args, **kwargs):
            calls.append(label + ("-exchange" if kwargs.get("exchange") or args[2:3] == (True,) else ""))
            if len(calls) == kill_at and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*args, **kwargs)
            if len(calls) == kill_at and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(module, name, counted)

    for module, name, label in ((io, "_write_step", "write"), (io, "_fsync", "fsync"), (io, "_rename", "rename"),
                                (spill, "write_block", "spill-write")):
        wrap(module, name, label)
    try:
        cli_main(argv)
    finally:
        Path(count_file).write_text(json.dumps(calls))


def tree(root: Path) -> dict[str, bytes]:
    """The published files of a run folder (its resumable .checkpoint left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".checkpoint" not in p.relative_to(root).parts}


def publish_kills(root: Path, n: int, rng: random.Random, reference: torch.Tensor) -> list[dict]:
    """Kill a spill run over an earlier one at `n` I/O instants; check old-or-new and the rerun."""
    from layerif.scores import LayerScores

    base = command(root / "model", root / "old", "spill")[3:] + ["--overwrite"]
    subprocess.run(command(root / "model", root / "old", "spill"), check=True, capture_output=True)
    old = tree(root / "old")
    count = root / "calls.json"

    def run_child(out: Path, kill_at: int, when: str) -> int:
        argv = [a if a != str(root / "old") else str(out) for a in base]
        return subprocess.run([sys.executable, __file__, "--child", str(kill_at), when, str(count), "--", *argv],
                              capture_output=True).returncode

    shutil.copytree(root / "old", root / "count" / "out")
    assert run_child(root / "count" / "out", 0, "before") == 0
    calls = json.loads(count.read_text())
    # the publish's renames (outputs into place, the folder exchange) are the last ones; every checkpoint unit
    # before them is a rename too, and those are sampled with the rest
    renames = [i + 1 for i, op in enumerate(calls) if op.startswith("rename")][-PUBLISH_RENAMES:]
    points = [(k, when) for k in renames for when in ("before", "after")]
    others = [(k, rng.choice(("before", "after"))) for k in rng.sample(range(1, len(calls) + 1), len(calls))]
    points = (points + [p for p in others if p not in points])[:max(n, len(points))]
    rows = []
    for k, when in points:
        parent = root / f"publish-{k}-{when}"
        out = parent / "out"
        shutil.copytree(root / "old", out)
        code = run_child(out, k, when)
        now = tree(out) if out.is_dir() else {}
        state = "old" if now == old else "broken"
        if state == "broken" and now.keys() == old.keys() and now["run.json"] != old["run.json"]:
            new_q = LayerScores.load(out).q
            state = "new" if float((new_q - reference).abs().max() / reference.abs().max()) <= 1e-6 else "broken"
        rerun = subprocess.run([sys.executable, "-m", "layerif", *[a if a != str(root / "old") else str(out)
                                                                  for a in base]], capture_output=True)
        q = LayerScores.load(out).q
        left = sorted(p.name for p in parent.iterdir() if p.name != "out")
        rows.append({"call": k, "of": len(calls), "operation": calls[k - 1], "when": when, "exit": code,
                     "folder_after_kill": state, "rerun_exit": rerun.returncode,
                     "max_rel_diff": float((q - reference).abs().max() / reference.abs().max()),
                     "left_beside": left})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[6:])
        return
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--publish-kills", type=int, default=30)
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
        leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                           if p.name not in (*OUTPUT_FILES, ".layerif.json"))  # the manifest of our outputs
        rows.append({"run": run, "strategy": strategy, "kill_at_s": round(kill_at, 2), "killed_after_s": round(killed_s, 2),
                     "finished_before_kill": finished_before_kill, "checkpoint_units_at_kill": len(units),
                     "resumed_units": len((record.get("resumed") or {}).get("units_loaded", [])),
                     "max_rel_diff": difference, "seconds_lost": round(killed_s + resumed_s - clean_s, 2),
                     "leftover_files": leftovers})
        print(rows[-1], flush=True)
    publish = publish_kills(root, args.publish_kills, rng, clean["spill"][0]) if "spill" in clean else []
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"command": "python bench/resume.py " + " ".join(sys.argv[1:]),
               "clean_seconds": {k: v[1] for k, v in clean.items()}, "runs": rows, "publish_kills": publish,
               "all_equal_1e-6": all(r["max_rel_diff"] <= 1e-6 for r in rows + publish),
               "no_leftover_files": not any(r["leftover_files"] for r in rows),
               "publish_old_or_new": all(r["folder_after_kill"] in ("old", "new") and r["rerun_exit"] == 0
                                         and not r["left_beside"] for r in publish)}
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
    lines += ["", "## Publish killed at an I/O call", "",
              "A spill run over a finished one (--overwrite) SIGKILLs itself just before or after its k-th write, "
              "fsync or rename (`rename-exchange`: the atomic folder exchange). Folder after the kill: `old` = the "
              "earlier run byte for byte, `new` = the complete new run.", "",
              "| call | operation | kill | folder after kill | rerun exit | max rel diff vs clean | left beside |",
              "|---|---|---|---|---|---|---|"]
    for r in publish:
        lines.append(f"| {r['call']}/{r['of']} | {r['operation']} | {r['when']} | {r['folder_after_kill']} | "
                     f"{r['rerun_exit']} | {r['max_rel_diff']:.1e} | {len(r['left_beside'])} |")
    lines += ["", f"All runs equal to the clean run within 1e-6: **{summary['all_equal_1e-6']}**; "
              f"no files left besides the outputs: **{summary['no_leftover_files']}**; every killed publish left "
              f"the old or the new run whole, and its rerun succeeded: **{summary['publish_old_or_new']}**."]
    (RESULTS / "resume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
