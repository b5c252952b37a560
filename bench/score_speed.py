"""Speed of `layerif score` against the paper's released-code style and a plain forward+backward.

SmolLM2-135M, 300 train x 50 validation rows of MRPC, full space, all modules. Measures, in one run:
  (a) `layerif score` end to end (a fresh process: model load included) and its passes;
  (b) the released-code style: for each layer separately, a batch-size-1 backward over every sample,
      then DataInf per validation sample with Python loops over samples and matrices, timed on
      --timed-layers layers and extrapolated to all 30;
  (c) one plain batched forward+backward (weight gradients) over the 350 samples.
Targets: (b)/(a) >= 50 and (a)/(c) <= 1.5 x passes. Writes bench/results/score_speed.{json,md}.

    python bench/score_speed.py                 # full size (about 30-40 min on 2 cores)
    python bench/score_speed.py --n-train 60 --n-val 10 --timed-layers 1    # smoke size
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from baseline import batches_for, paper_style_layer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "moe" / "mrpc"
RESULTS = REPO / "bench" / "results"


def run_layerif(n_train: int, n_val: int, batch_size: int, strategy: str = "auto") -> dict:
    """(a): the CLI in a fresh process, as a user runs it."""
    out = Path(tempfile.mkdtemp(prefix="layerif-bench-")) / "run"
    command = [sys.executable, "-m", "layerif", "score", "--model", "smollm2-135m",
               "--train", str(DATA / "train.jsonl"), "--val", str(DATA / "validation.jsonl"),
               "--n-train", str(n_train), "--n-val", str(n_val), "--batch-size", str(batch_size),
               "--strategy", strategy, "--out", str(out), "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    record = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "passes": record["passes"], "plan": record["plan"], "timings_s": record["timings_s"],
            "peak_rss_gib": record["peak_rss_bytes"] / 2**30, "out": str(out)}


def plain_forward_backward(model, tokenizer, rows, batch_size) -> float:
    """(c): one batched forward+backward with ordinary weight gradients over all samples."""
    from layerif.data.tokens import per_sample_loss

    batches = batches_for(tokenizer, rows, batch_size)
    for param in model.parameters():
        param.requires_grad_(True)
    started = time.perf_counter()
    for batch in batches:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        per_sample_loss(logits, batch.labels).sum().backward()
    elapsed = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timed-layers", type=int, default=2, help="layers timed for (b), extrapolated to all; 0 skips (b)")
    parser.add_argument("--baseline-train", type=int, default=None,
                        help="(b): time on this many training rows and scale linearly to --n-train")
    parser.add_argument("--baseline-val", type=int, default=None,
                        help="(b): time on this many validation rows and scale linearly to --n-val")
    parser.add_argument("--strategy", default="auto", help="(a): --strategy of layerif score (auto, store, spill, stream)")
    parser.add_argument("--tag", default="", help="suffix for the result files")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"benchmark data not found at {DATA}")
    from layerif.data import load_rows
    from layerif.models import load_model
    from layerif.scores import LayerScores

    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    print("(a) layerif score ...", flush=True)
    a = run_layerif(args.n_train, args.n_val, args.batch_size, args.strategy)
    print(f"    {a['wall_s']:.1f} s, {a['passes']} pass(es), plan {a['plan']['mode']}", flush=True)

    loaded = load_model("smollm2-135m", quiet=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    train_rows = load_rows(DATA / "train.jsonl")[: args.n_train]
    val_rows = load_rows(DATA / "validation.jsonl")[: args.n_val]
    print("(c) plain batched forward+backward ...", flush=True)
    c = plain_forward_backward(model, tokenizer, train_rows + val_rows, args.batch_size)
    print(f"    {c:.1f} s", flush=True)

    from layerif.models import find_blocks

    n_layers = len(find_blocks(model)[1])
    timed = sorted({round(i * (n_layers - 1) / max(args.timed_layers - 1, 1)) for i in range(args.timed_layers)})
    scores = LayerScores.load(a["out"])
    per_layer = []
    for layer in timed:
        print(f"(b) released-code style, layer {layer} ...", flush=True)
        sub_train = train_rows[: args.baseline_train or args.n_train]
        sub_val = val_rows[: args.baseline_val or args.n_val]
        result = paper_style_layer(model, tokenizer, sub_train, sub_val, layer)
        # per-sample gradients scale with the sample count, the DataInf loops with n_train x n_val
        result["measured_on"] = [len(sub_train), len(sub_val)]
        result["gradients_measured_s"], result["datainf_measured_s"] = result["gradients_s"], result["datainf_s"]
        result["gradients_s"] *= (args.n_train + args.n_val) / (len(sub_train) + len(sub_val))
        result["datainf_s"] *= (args.n_train * args.n_val) / (len(sub_train) * len(sub_val))
        theirs = result.pop("q")
        if len(sub_train) == args.n_train and len(sub_val) == args.n_val:
            ours, theirs = scores.q[layer].double(), torch.tensor(theirs, dtype=torch.float64)
            result["max_rel_diff_vs_layerif"] = float((ours - theirs).abs().max() / theirs.abs().max())
        per_layer.append(result)
        print(f"    gradients {result['gradients_s']:.1f} s, DataInf loops {result['datainf_s']:.1f} s "
              f"(measured on {result['measured_on']} rows, scaled)", flush=True)
    b_per_layer = sum(r["gradients_s"] + r["datainf_s"] for r in per_layer) / len(per_layer) if per_layer else None
    b = b_per_layer * n_layers if per_layer else None
    summary = {
        "setup": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)", "data": "MRPC train/validation",
                  "n_train": args.n_train, "n_val": args.n_val, "batch_size": args.batch_size,
                  "space": "full", "modules": "all", "estimator": "datainf", "torch_threads": torch.get_num_threads()},
        "a_layerif": a, "b_paper_style": {"per_layer": per_layer, "timed_layers": timed,
                                          "extrapolated_total_s": b, "per_layer_mean_s": b_per_layer},
        "c_plain_fwd_bwd_s": c,
        "ratios": {"b_over_a": b / a["wall_s"] if b else None, "a_over_c": a["wall_s"] / c,
                   "a_over_c_limit": 1.5 * a["passes"],
                   "a_scoring_only_over_c": a["timings_s"]["influence_s"] / c},
        "command": "python " + " ".join([f"bench/{Path(__file__).name}", *sys.argv[1:]]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"score_speed{args.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    ratios = summary["ratios"]
    lines = [
        f"# Scoring speed — {summary['setup']['model']}, {args.n_train} x {args.n_val} MRPC rows, full space, all modules",
        "",
        f"Command: `{summary['command']}` (torch threads: {torch.get_num_threads()}; machine shared, so read the ratios).",
        "",
        "| measurement | seconds |",
        "|---|---|",
        f"| (a) `layerif score` end to end ({a['passes']} pass(es), plan `{a['plan']['mode']}`, model load included) | {a['wall_s']:.1f} |",
        f"| (a) of which model load | {a['timings_s']['load_model_s']:.1f} |",
        f"| (a) of which passes + estimator | {a['timings_s']['influence_s']:.1f} |",
        *([f"| (b) released-code style, per layer (mean of layers {timed}) | {b_per_layer:.1f} |",
           f"| (b) extrapolated to {n_layers} layers | {b:.0f} |"] if per_layer else []),
        f"| (c) plain batched forward+backward over {args.n_train + args.n_val} samples | {c:.1f} |",
        "",
        *([f"- (b)/(a) = **{ratios['b_over_a']:.1f}x** (target >= 50x)"] if per_layer else
          ["- (b) not timed in this run (--timed-layers 0)"]),
        f"- (a)/(c) = **{ratios['a_over_c']:.2f}** (target <= 1.5 x passes = {ratios['a_over_c_limit']:.1f}); "
        f"scoring alone / (c) = {ratios['a_scoring_only_over_c']:.2f}",
        f"- peak RSS of (a): {a['peak_rss_gib']:.2f} GiB; plan: {a['plan']['reason']}",
    ]
    if not per_layer:
        pass
    elif all("max_rel_diff_vs_layerif" in r for r in per_layer):
        lines.append("- agreement of (b) with (a) on the timed layers (max relative difference of q): "
                     + ", ".join(f"layer {r['layer']}: {r['max_rel_diff_vs_layerif']:.1e}" for r in per_layer))
    else:
        sub = per_layer[0]["measured_on"]
        lines.append(f"- (b) was timed on the first {sub[0]} x {sub[1]} rows and scaled to {args.n_train} x {args.n_val}: "
                     "per-sample gradient time by the number of samples, the DataInf loops by n_train x n_val "
                     "(each loop iteration does the same work). Measured: "
                     + ", ".join(f"layer {r['layer']}: gradients {r['gradients_measured_s']:.1f} s, loops "
                                 f"{r['datainf_measured_s']:.1f} s" for r in per_layer)
                     + ". Agreement of the two methods is checked by the unit tests and at the smoke size.")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
