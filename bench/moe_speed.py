"""One LoRA-MoE training step with the LM head everywhere (before) and at the answer positions only (after).

SmolLM2-135M (float32), the uniform LoRA-MoE of the study (5 experts per layer, top-2, rank 8, every
projection), the first `--batch` MRPC training rows, loss on the answer tokens only. Both variants run on the
same batch, alternating (before, after, before, ...) so machine noise falls on both alike; the median of
`--repeats` steps (forward, backward, AdamW step) after one warm-up step each. Then `torch.profiler` records
one answer-only step and names the largest costs left.

    python bench/moe_speed.py            # writes bench/results/moe_speed.md (run it alone on the machine)
    python bench/moe_speed.py --smoke    # tiny sizes: checks the code, writes under runs/
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "moe"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default=str(DATA / "mrpc"), help="folder with train.jsonl")
    parser.add_argument("--batch", type=int, default=8, help="rows in the step (the study's batch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, output under runs/moe-speed-smoke")
    parser.add_argument("--out", help="results folder (default bench/results, or runs/moe-speed-smoke)")
    return parser.parse_args(argv)


def setup(args):
    """(model with a uniform LoRA-MoE, the batch, its number of target tokens, AdamW)."""
    import torch

    from layerif.allocate.experts import allocate_experts
    from layerif.data import load_rows
    from layerif.models import find_blocks, load_model
    from layerif.moe import MoEConfig, inject_moe
    from layerif.moe.train import _collate, encode_training_rows

    loaded = load_model(args.model, dtype="float32", quiet=True)
    n_layers = len(find_blocks(loaded.model)[1])
    allocation = allocate_experts("uniform", n_layers, 5 * n_layers)
    inject_moe(loaded.model, MoEConfig(counts=allocation.counts, top_k=allocation.top_k), seed=0)
    rows = load_rows(Path(args.task) / "train.jsonl")[: args.batch]
    items = encode_training_rows(rows, loaded.tokenizer, cutoff=256, train_on_inputs=False)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    batch = _collate(items, pad)
    optimizer = torch.optim.AdamW([p for p in loaded.model.parameters() if p.requires_grad], lr=3e-4)
    loaded.model.train()
    return loaded.model, batch, sum(item["n_target"] for item in items), optimizer


def step(model, batch, n_tokens: int, optimizer, full_head: bool) -> float:
    """One training step; its wall seconds."""
    from layerif.moe.inject import set_token_mask
    from layerif.moe.train import token_loss

    started = time.perf_counter()
    set_token_mask(model, batch["attention_mask"].bool())
    (token_loss(model, batch, full_head=full_head) / n_tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.batch, args.repeats = min(args.batch, 2), min(args.repeats, 2)
    import torch

    from layerif.compare.units import machine_state
    from layerif.io import atomic_write_text

    torch.set_num_threads(args.threads)
    state = machine_state()
    model, batch, n_tokens, optimizer = setup(args)
    times = {True: [], False: []}
    for full_head in (True, False):
        step(model, batch, n_tokens, optimizer, full_head)  # warm-up
    for _ in range(args.repeats):
        for full_head in (True, False):
            times[full_head].append(step(model, batch, n_tokens, optimizer, full_head))
    before, after = statistics.median(times[True]), statistics.median(times[False])
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, batch, n_tokens, optimizer, full_head=False)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = events[:10]
    command = "python bench/moe_speed.py" + (" --smoke" if args.smoke else "")
    lines = ["# LoRA-MoE training step: LM head everywhere vs at the answer positions only", "",
             f"Command: `{command}`. Model {args.model}, batch of {len(batch['input_ids'])} rows "
             f"({batch['input_ids'].shape[1]} tokens padded, {n_tokens} answer tokens), torch threads: "
             f"{args.threads}. Machine: {state.get('cpus')} CPUs, load average {state.get('load_average')} at the start, "
             f"torch {state['torch']}.", "",
             "| head | median step (s) | steps (s) |", "|---|---|---|",
             f"| everywhere (before) | {before:.3f} | {', '.join(f'{t:.3f}' for t in times[True])} |",
             f"| answer positions (after) | {after:.3f} | {', '.join(f'{t:.3f}' for t in times[False])} |", "",
             f"Speed-up ×{before / after:.2f}; the head everywhere cost {100 * (before - after) / before:.0f} % of "
             "the step.", "",
             f"Largest costs of one answer-only step (torch.profiler, self CPU time): the first is "
             f"**{top[0].key}** ({100 * top[0].self_cpu_time_total / total:.0f} %).", "",
             "| op | self CPU (ms) | share | calls |", "|---|---|---|---|"]
    lines += [f"| {e.key} | {e.self_cpu_time_total / 1000:.1f} | {100 * e.self_cpu_time_total / total:.1f} % | "
              f"{e.count} |" for e in top]
    out = Path(args.out) if args.out else (REPO / "runs" / "moe-speed-smoke" if args.smoke else REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "moe_speed.md", "\n".join(lines) + "\n")
    print(f"before {before:.3f} s, after {after:.3f} s (×{before / after:.2f}); wrote {out / 'moe_speed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
