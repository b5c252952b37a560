"""GPU check: LayerIF on a Mistral-7B-shaped model (random bf16 weights built from its config, no download).

One command on one large GPU (gpu_check.sh stops it after 8 minutes), 300 train x 50 validation random
sequences of 128 tokens, full space, all modules:
  (a) `score_layers`: all 32 blocks in one call (wall time, passes, plan, peak GPU memory);
  (c) one plain batched forward+backward (ordinary weight gradients) over the same 350 sequences;
  (b) the released-code style on one block (batch-size-1 backward per sample, then Python DataInf loops over
      validation x train x matrices), timed on a subset and scaled: the per-sample gradients by the number of
      samples, the loops by n_train x n_val, one block by the number of blocks (the middle block is timed:
      its backward is the mean depth).
Goal: (a)/(c) <= 1.8 and (a) <= 120 s. Writes bench/results/gpu.md and gpu.json (the JSON beside the --out file).

    bash bench/gpu_check.sh                          # the check, on a machine with one large GPU
    python bench/gpu_check.py --smoke --out s.md     # tiny Mistral on CPU: every code path, under a minute
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from baseline import batches_for, paper_style_layer

from layerif.api import ScoreConfig, score_layers
from layerif.data.tokens import per_sample_loss
from layerif.errors import LayerIFError
from layerif.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_RATIO = 1.8  # (a)/(c)
GOAL_SECONDS = 120.0  # (a)
PAPER_PER_LAYER_S = 402.8  # the paper's DataInf cost per layer for Mistral-7B at 300 x 50 (released code, 4 GPUs)
SIZES = {"layers": 32, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 32000,
         "n_train": 300, "n_val": 50, "seq_len": 128, "batch_size": 16, "paper_n_train": 30, "paper_n_val": 5}
# the subset of (b) is the whole smoke data, so the smoke also checks (b) against (a)
SMOKE = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 128,
         "n_train": 12, "n_val": 4, "seq_len": 24, "batch_size": 4, "paper_n_train": 12, "paper_n_val": 4}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_model(sizes: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random Mistral of these sizes, made directly on `device` in `dtype`."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
                           intermediate_size=sizes["intermediate"], num_hidden_layers=sizes["layers"],
                           num_attention_heads=sizes["heads"], num_key_value_heads=sizes["kv_heads"],
                           max_position_embeddings=4096)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """work()'s result, its wall time until the device is done, and the peak GPU memory in GiB (None on CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # memory cached by the last stage would look used to the next one's plan
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = work()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return result, seconds, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None


def plain_forward_backward(model: torch.nn.Module, batches: list) -> None:
    """(c): forward+backward of every batch with ordinary gradients of every weight."""
    device = next(model.parameters()).device
    for param in model.parameters():
        param.requires_grad_(True)
    for batch in batches:
        on_device = batch.to(device)
        logits = model(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask,
                       use_cache=False).logits
        per_sample_loss(logits, on_device.labels).sum().backward()
    model.zero_grad(set_to_none=True)


def released_style(model: torch.nn.Module, train: list, val: list, block: int, sizes: dict) -> dict:
    """(b) timed on the first paper_n_train x paper_n_val rows for one block, and scaled to all rows and blocks."""
    sub_train, sub_val = train[: sizes["paper_n_train"]], val[: sizes["paper_n_val"]]
    measured = paper_style_layer(model, None, sub_train, sub_val, block)
    grad_scale = (len(train) + len(val)) / (len(sub_train) + len(sub_val))
    loop_scale = (len(train) * len(val)) / (len(sub_train) * len(sub_val))
    per_block = measured["gradients_s"] * grad_scale + measured["datainf_s"] * loop_scale
    return {"block": block, "measured_on": [len(sub_train), len(sub_val)], "gradients_s": measured["gradients_s"],
            "datainf_s": measured["datainf_s"], "gradient_scale": grad_scale, "loop_scale": loop_scale,
            "per_block_s": per_block, "all_blocks_s": per_block * sizes["layers"], "q": measured["q"]}


def check(args: argparse.Namespace, sizes: dict, config: ScoreConfig) -> dict:
    """Run (c), (a) and (b) and return the report."""
    if not args.smoke and not torch.cuda.is_available():
        raise LayerIFError("no GPU found: this check needs one (python bench/gpu_check.py --smoke checks the script)")
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the estimator's float32 matmuls stay float32
    report: dict = {"smoke": args.smoke, "command": "python bench/gpu_check.py " + " ".join(args.argv),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "dtype": args.dtype, "sizes": sizes}
    model, report["build_model_s"], _ = timed(device, lambda: build_model(sizes, device, DTYPES[args.dtype]))
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"model: {report['parameters']:,} parameters ({report['weights_gib']:.1f} GiB) on "
          f"{report['device']}, built in {report['build_model_s']:.1f} s", flush=True)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, sizes["vocab"], (sizes["n_train"] + sizes["n_val"], sizes["seq_len"]),
                           generator=generator)
    train, val = list(tokens[: sizes["n_train"]]), list(tokens[sizes["n_train"]:])

    batches = batches_for(None, train + val, sizes["batch_size"])
    timed(device, lambda: plain_forward_backward(model, batches[:1]))  # warm-up: one-off kernel and library costs
    _, seconds, peak = timed(device, lambda: plain_forward_backward(model, batches))
    report["c_plain"] = {"seconds": seconds, "peak_gpu_gib": peak, "rows": len(train) + len(val),
                         "batches": len(batches)}
    print(f"(c) plain batched forward+backward over {len(train) + len(val)} rows: {seconds:.2f} s", flush=True)

    scores, seconds, peak = timed(device, lambda: score_layers(model, None, train, val, config))
    plan = scores.metadata["plan"]
    report["a_layerif"] = {"seconds": seconds, "peak_gpu_gib": peak, "blocks_scored": int(scores.q.shape[0]),
                           "rows": [int(scores.q.shape[1]), len(val)], "passes": scores.metadata["train_passes"],
                           "plan_mode": plan["mode"], "plan_reason": plan["reason"],
                           "plan_batch_size": plan["batch_size"], "timings_s": scores.metadata["timings"],
                           "finite": bool(torch.isfinite(scores.q).all())}
    print(f"(a) score_layers, {scores.q.shape[0]} blocks: {seconds:.2f} s, {report['a_layerif']['passes']} "
          f"pass(es), plan {plan['mode']}", flush=True)

    block = sizes["layers"] // 2
    b, seconds, peak = timed(device, lambda: released_style(model, train, val, block, sizes))
    theirs = torch.tensor(b.pop("q"), dtype=torch.float64)
    if b["measured_on"] == [len(train), len(val)]:
        ours = scores.q[block].double()
        b["max_rel_diff_vs_layerif"] = float((ours - theirs).abs().max() / theirs.abs().max())
    report["b_released"] = {**b, "wall_s": seconds, "peak_gpu_gib": peak}
    print(f"(b) released-code style, block {block} on {b['measured_on']} rows: gradients {b['gradients_s']:.2f} s, "
          f"loops {b['datainf_s']:.2f} s; scaled to all rows and {sizes['layers']} blocks: {b['all_blocks_s']:.0f} s",
          flush=True)

    a_s, c_s = report["a_layerif"]["seconds"], report["c_plain"]["seconds"]
    report["ratios"] = {"a_over_c": a_s / c_s, "b_over_a": b["all_blocks_s"] / a_s}
    report["goals"] = [
        {"name": "(a)/(c)", "value": a_s / c_s, "limit": GOAL_RATIO, "unit": "", "met": a_s / c_s <= GOAL_RATIO},
        {"name": "(a)", "value": a_s, "limit": GOAL_SECONDS, "unit": " s", "met": a_s <= GOAL_SECONDS},
    ]
    report["goals_met"] = all(goal["met"] for goal in report["goals"]) and report["a_layerif"]["finite"]
    return report


def gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.1f}"


def to_markdown(report: dict) -> str:
    """The committed report."""
    sizes, a, b, c = report["sizes"], report["a_layerif"], report["b_released"], report["c_plain"]
    rows = f"{sizes['n_train']} x {sizes['n_val']} rows of {sizes['seq_len']} tokens"
    title = "Mistral-7B shape" if not report["smoke"] else "SMOKE: tiny Mistral on CPU, not the check"
    lines = [
        f"# GPU check — {title}, random {report['dtype']} weights, {rows}\n",
        f"Command: `{report['command']}` on {report['device']} (torch {report['torch']}). Model: "
        f"{sizes['layers']} blocks, hidden {sizes['hidden']}, intermediate {sizes['intermediate']}, "
        f"{sizes['heads']} heads ({sizes['kv_heads']} KV), vocab {sizes['vocab']}: "
        f"{report['parameters']:,} parameters, {report['weights_gib']:.1f} GiB of weights, built in "
        f"{report['build_model_s']:.1f} s. Full space, all modules, DataInf.\n",
        "| stage | seconds | peak GPU memory (GiB, weights included) |",
        "|---|---|---|",
        f"| (c) plain batched forward+backward, {c['rows']} rows in {c['batches']} batches of "
        f"{sizes['batch_size']} | {c['seconds']:.2f} | {gib(c['peak_gpu_gib'])} |",
        f"| (a) `score_layers`, all {a['blocks_scored']} blocks in one call ({a['passes']} pass(es), plan "
        f"`{a['plan_mode']}`, batches of {a['plan_batch_size']}) | {a['seconds']:.2f} | {gib(a['peak_gpu_gib'])} |",
        f"| (b) released-code style, block {b['block']}, measured on {b['measured_on'][0]} x {b['measured_on'][1]} "
        f"rows: gradients + loops | {b['gradients_s']:.2f} + {b['datainf_s']:.2f} | {gib(b['peak_gpu_gib'])} |",
        f"| (b) scaled to {sizes['n_train']} x {sizes['n_val']} rows (gradients x {b['gradient_scale']:.1f}, "
        f"loops x {b['loop_scale']:.1f}): one block | {b['per_block_s']:.1f} | |",
        f"| (b) scaled to all {sizes['layers']} blocks | {b['all_blocks_s']:.0f} | |",
        "",
    ]
    for goal in report["goals"]:
        unit = goal["unit"]
        lines.append(f"- {goal['name']} = **{goal['value']:.2f}{unit}** (goal <= {goal['limit']:g}{unit}): "
                     f"**{'PASS' if goal['met'] else 'FAIL'}**")
    lines += [f"- speedup of (a) over the released-code style (b)/(a): **{report['ratios']['b_over_a']:.0f}x** "
              f"(the paper reports {PAPER_PER_LAYER_S} s per layer for its released code on 4 GPUs)",
              f"- scores finite: {a['finite']}; plan: {a['plan_reason']}",
              "- (a) stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in a["timings_s"].items())]
    if "max_rel_diff_vs_layerif" in b:
        lines.append(f"- (b) against (a) on block {b['block']} (same rows): max relative difference of q "
                     f"{b['max_rel_diff_vs_layerif']:.1e}")
    verdict = f"Goals {'met' if report['goals_met'] else 'NOT met'}."
    if report["smoke"]:
        verdict += " (Smoke sizes on CPU: the goals are for the GPU check; this run only exercises the script.)"
    lines += ["", verdict, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in SIZES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {default} ({SMOKE[name]} with --smoke)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--strategy", default="auto", help="--strategy of the scoring (auto, store, spill, stream)")
    parser.add_argument("--max-memory", default=None, help="budget for stored gradients (default: half the free)")
    parser.add_argument("--smoke", action="store_true", help="tiny Mistral on CPU (checks the script, not the GPU)")
    parser.add_argument("--out", type=Path, default=None, help="markdown report; the JSON goes beside it "
                        "(default bench/results/gpu.md, with --smoke a file in the temporary directory)")
    args = parser.parse_args(argv)
    args.argv = argv
    if any(getattr(args, name) is not None and getattr(args, name) < 1 for name in SIZES):
        print("error: sizes must be positive", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check_smoke.md" if args.smoke else RESULTS / "gpu.md")
    sizes = {**(SMOKE if args.smoke else SIZES), **{k: v for k, v in vars(args).items() if k in SIZES and v}}
    try:
        config = ScoreConfig(batch_size=sizes["batch_size"], max_length=sizes["seq_len"], strategy=args.strategy,
                             max_memory=args.max_memory, quiet=True)
        config.validate()  # before minutes of model building
        report = check(args, sizes, config)
        text = to_markdown(report)
        atomic_write_json(out.with_suffix(".json"), report)
        atomic_write_text(out, text)
    except LayerIFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
