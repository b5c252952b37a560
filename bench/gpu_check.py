"""GPU check: LayerIF scoring of a Mistral-7B-shaped model (random weights, built from its config, no download).

300 train x 50 validation random token sequences of length 128, full space, all modules, bf16 weights.
Prints wall time per stage, passes and peak GPU memory, then times the released-code style (per layer,
batch size 1, Python DataInf loops) on 4 layers for the ratio. The baseline runs on a subset of the
samples (per-sample gradients of a 7B layer for 350 samples would not fit) and is extrapolated:
gradient time scales with n_train + n_val, the DataInf loops with n_train x n_val.

    bash bench/gpu_check.sh            # on a machine with one large GPU, well under 10 minutes
    python bench/gpu_check.py --smoke  # tiny config on CPU, to check the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import paper_style_layer  # noqa: E402


def build_model(args, device, dtype):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--paper-layers", type=int, default=4)
    parser.add_argument("--paper-n-train", type=int, default=30)
    parser.add_argument("--paper-n-val", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--smoke", action="store_true", help="tiny Mistral on CPU (checks the script, not the GPU)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 4, 64, 128, 4, 2, 256
        args.n_train, args.n_val, args.paper_layers, args.paper_n_train, args.paper_n_val = 24, 6, 2, 6, 2
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # estimator maths stays true float32
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    from layerif.api import ScoreConfig, score_layers

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "args": vars(args)}
    started = time.perf_counter()
    model = build_model(args, device, dtype)
    sync()
    report["build_model_s"] = time.perf_counter() - started
    report["parameters"] = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, args.vocab, (args.n_train + args.n_val, args.seq_len), generator=generator)
    train, val = list(tokens[: args.n_train]), list(tokens[args.n_train:])
    print(f"model: {report['parameters'] / 1e9:.2f} B parameters on {report['device']} "
          f"({report['build_model_s']:.1f} s to build)", flush=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    scores = score_layers(model, None, train, val, ScoreConfig(batch_size=args.batch_size, max_length=args.seq_len))
    sync()
    report["layerif"] = {
        "wall_s": time.perf_counter() - started,
        "timings_s": scores.metadata["timings"],
        "passes": scores.metadata["train_passes"],
        "plan": scores.metadata["plan"],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "finite": bool(torch.isfinite(scores.q).all()),
    }
    print(json.dumps(report["layerif"], indent=2, default=str), flush=True)

    timed = [round(i * (args.layers - 1) / max(args.paper_layers - 1, 1)) for i in range(args.paper_layers)]
    sub_train, sub_val = train[: args.paper_n_train], val[: args.paper_n_val]
    per_layer = []
    for layer in timed:
        result = paper_style_layer(model, None, sub_train, sub_val, layer)
        result.pop("q")
        per_layer.append(result)
        print(f"released-code style, layer {layer}: gradients {result['gradients_s']:.1f} s, "
              f"DataInf loops {result['datainf_s']:.1f} s", flush=True)
    grad_scale = (args.n_train + args.n_val) / (args.paper_n_train + args.paper_n_val)
    loop_scale = (args.n_train * args.n_val) / (args.paper_n_train * args.paper_n_val)
    per_layer_full = sum(r["gradients_s"] * grad_scale + r["datainf_s"] * loop_scale for r in per_layer) / len(per_layer)
    report["paper_style"] = {"timed_layers": timed, "subset": [args.paper_n_train, args.paper_n_val],
                             "per_layer": per_layer, "per_layer_extrapolated_s": per_layer_full,
                             "all_layers_extrapolated_s": per_layer_full * args.layers}
    report["ratio_paper_over_layerif"] = per_layer_full * args.layers / report["layerif"]["wall_s"]
    print(f"released-code style extrapolated: {per_layer_full:.0f} s per layer, "
          f"{per_layer_full * args.layers:.0f} s for {args.layers} layers; "
          f"ratio to layerif: {report['ratio_paper_over_layerif']:.0f}x", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_smoke.json" if args.smoke else "gpu_check.json"
    (out / name).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
