"""Command line: `layerif score | demo | allocate | prune | evaluate | moe`. Thin: parse, call the API, print."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LayerIF: data-driven layer quality scores for language models, and their uses.")
allocate_app = typer.Typer(no_args_is_help=True, help="Turn layer scores into per-layer expert counts or sparsities.")
moe_app = typer.Typer(no_args_is_help=True, help="Train and evaluate LoRA-MoE adapters with per-layer expert counts.")
app.add_typer(allocate_app, name="allocate")
app.add_typer(moe_app, name="moe")


# ---- scoring commands (layerif score, layerif demo) ----
def _score_config(**kwargs):
    from layerif.api import ScoreConfig

    return ScoreConfig(**kwargs)


@app.command()
def score(
    model: str = typer.Option(..., "--model", help="Hub id, local model directory, .gguf file, or built-in name (smollm2-135m)."),
    train: str = typer.Option(..., "--train", help="Training data: JSONL/JSON/CSV file, or dataset name with --train-split."),
    val: str = typer.Option(..., "--val", help="Validation data: JSONL/JSON/CSV file, or dataset name with --val-split."),
    out: str = typer.Option(..., "--out", help="Output directory for the run."),
    gguf_file: str | None = typer.Option(None, "--gguf-file", help="GGUF file name inside --model's directory."),
    train_split: str | None = typer.Option(None, "--train-split", help="Split of a datasets dataset for --train."),
    val_split: str | None = typer.Option(None, "--val-split", help="Split of a datasets dataset for --val."),
    n_train: int = typer.Option(300, "--n-train", help="Training rows (first n, as in the paper)."),
    n_val: int = typer.Option(50, "--n-val", help="Validation rows (first n)."),
    sample_seed: int | None = typer.Option(None, "--sample-seed", help="Random subset with this seed instead of the first rows."),
    max_length: int = typer.Option(128, "--max-length", help="Tokens per sample after truncation."),
    params: str = typer.Option("full", "--params", help="Parameter space: full or lora."),
    modules: str = typer.Option("all", "--modules", help="Block matrices: attn, mlp or all."),
    estimator: str = typer.Option("datainf", "--estimator", help="datainf, exact or identity."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per batch."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Budget for stored gradients, e.g. 4GiB (default: half the free memory)."),
    pairwise: bool = typer.Option(False, "--pairwise", help="Also save the n_train x n_val influence per layer."),
    strategy: str = typer.Option("auto", "--strategy", help="auto, store or stream."),
    finetune_epochs: float = typer.Option(0.0, "--finetune-epochs", help="LoRA fine-tuning epochs before scoring (--params lora)."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="LoRA rank (--params lora)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype: float32, bfloat16, float16 (default: the checkpoint's)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or table."),
) -> None:
    """Score every block of MODEL with LayerIF on your train/validation data."""
    from layerif.report.tables import print_layer_table
    from layerif.runs import ScoreRun, describe, run_score

    config = _score_config(
        n_train=n_train, n_val=n_val, sample_seed=sample_seed, max_length=max_length, params=params,
        modules=modules, estimator=estimator, batch_size=batch_size, max_memory=max_memory, pairwise=pairwise,
        strategy=strategy, finetune_epochs=finetune_epochs, lora_rank=lora_rank, quiet=quiet,
    )
    run = ScoreRun(model=model, train=train, val=val, out=out, gguf_file=gguf_file, train_split=train_split,
                   val_split=val_split, dtype=dtype, device=device, overwrite=overwrite, config=config)
    scores, path = run_score(run)
    if not quiet:
        print_layer_table(scores, title=f"LayerIF layer scores ({estimator}, {params} space, {modules} modules)")
    typer.echo(describe(path))


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", "--model", help="Model to score (default: the built-in SmolLM2-135M)."),
    task: str = typer.Option("facts", "--task", help="Built-in demo task: facts, capitals or arithmetic."),
    n_train: int = typer.Option(120, "--n-train", help="Training rows generated."),
    n_val: int = typer.Option(30, "--n-val", help="Validation rows generated."),
    out: str = typer.Option("runs/demo", "--out", help="Output directory."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per batch."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Score the built-in model on a built-in task and print the per-layer table (replaces --out)."""
    from layerif.report.tables import print_layer_table
    from layerif.runs import ScoreRun, describe, run_score

    config = _score_config(n_train=n_train, n_val=n_val, batch_size=batch_size, quiet=quiet)
    run = ScoreRun(model=model, train=None, val=None, out=out, overwrite=True, demo_task=task, config=config)
    scores, path = run_score(run)
    print_layer_table(scores, title=f"LayerIF layer scores — {model} on the built-in '{task}' task")
    typer.echo(describe(path))


# ---- end scoring commands ----


# ---- pruning commands (layerif allocate sparsity, layerif prune, layerif evaluate) ----
# ---- end pruning commands ----


# ---- LoRA-MoE commands (layerif allocate experts, layerif moe train, layerif moe evaluate) ----
_ALLOCATION_HELP = ("layerif, reversed, uniform, mola-2468, mola-8642, mola-5555, alphalora, "
                    "or a comma list of counts per layer")


@allocate_app.command("experts")
def allocate_experts_command(
    scores: str | None = typer.Option(None, "--scores", help="Run folder of `layerif score` (for layerif/reversed)."),
    budget: int | None = typer.Option(None, "--budget", help="Total experts T over all layers (>= number of layers)."),
    beta: float = typer.Option(2.5, "--beta", help="Exponent beta > 0 applied to the scores (or PL_Alpha_Hill)."),
    score: str = typer.Option("S_pos", "--score", help="Layer score: S_pos, S_top25 or S_all."),
    allocation: str = typer.Option("layerif", "--allocation", help=_ALLOCATION_HELP),
    top_k: int | None = typer.Option(None, "--top-k", help="Experts per token: min(k, n_l) per layer (default k = 2)."),
    layers: int | None = typer.Option(None, "--layers", help="Number of layers (for uniform/MoLA without --scores)."),
    model: str | None = typer.Option(None, "--model", help="Model for alphalora (its PL_Alpha_Hill per block)."),
    out: str | None = typer.Option(None, "--out", help="Folder for experts.json (default: print the counts)."),
) -> None:
    """Turn layer scores into LoRA experts per layer (exactly --budget in total, >= 1 per layer)."""
    from layerif.moe.pipeline import allocation_from_scores

    loaded_model = None
    if allocation == "alphalora":
        if model is None:
            raise _error("--allocation alphalora needs --model")
        from layerif.models import load_model

        loaded_model = load_model(model, quiet=True).model
    if layers is None and scores is not None and allocation not in ("layerif", "reversed"):
        from layerif.scores import LayerScores

        layers = LayerScores.load(scores).n_layers
    result = allocation_from_scores(allocation, budget, beta, top_k, scores_dir=scores, score=score,
                                    n_layers=layers, model=loaded_model)
    if out is None:
        typer.echo(f"counts: {','.join(map(str, result.counts))}")
        typer.echo(f"top_k:  {','.join(map(str, result.top_k))}")
        typer.echo(f"total:  {result.budget} experts over {result.n_layers} layers")
    else:
        typer.echo(f"wrote {result.save(out)}")


def _error(message: str):
    from layerif.errors import LayerIFError

    return LayerIFError(message)


@moe_app.command("train")
def moe_train_command(
    model: str = typer.Option(..., "--model", help="Hub id, local model folder, .gguf file or built-in name."),
    train: str = typer.Option(..., "--train", help="Training rows: JSONL/JSON/CSV file or dataset name."),
    out: str = typer.Option(..., "--out", help="Folder for the adapter, experts.json and train.json."),
    split: str | None = typer.Option(None, "--split", help="Split of a datasets dataset for --train."),
    allocation: str = typer.Option("layerif", "--allocation", help=_ALLOCATION_HELP),
    scores: str | None = typer.Option(None, "--scores", help="Run folder of `layerif score` (layerif/reversed)."),
    budget: int | None = typer.Option(None, "--budget", help="Total experts T (not needed for a comma list)."),
    beta: float = typer.Option(2.5, "--beta", help="Exponent beta > 0 of the allocation."),
    score: str = typer.Option("S_pos", "--score", help="Layer score: S_pos, S_top25 or S_all."),
    top_k: int | None = typer.Option(None, "--top-k", help="Experts per token: min(k, n_l) per layer (default k = 2)."),
    rank: int = typer.Option(8, "--rank", help="Rank of every LoRA expert."),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (scale alpha / rank)."),
    dropout: float = typer.Option(0.05, "--dropout", help="Dropout on the expert input."),
    modules: str = typer.Option("all", "--modules", help="Projections that get experts: attn, mlp or all."),
    load_balancing: float = typer.Option(0.0, "--load-balancing", help="Switch balance-loss coefficient (0 = off; 0.01 typical)."),
    epochs: float = typer.Option(3.0, "--epochs", help="Passes over the training rows."),
    lr: float = typer.Option(3e-4, "--lr", help="AdamW learning rate."),
    batch_size: int = typer.Option(16, "--batch-size", help="Effective batch size."),
    micro_batch_size: int = typer.Option(4, "--micro-batch-size", help="Rows per forward (gradient accumulation)."),
    warmup: float | None = typer.Option(None, "--warmup", help="Warm-up steps (>= 1) or fraction (< 1); default min(100, 10 %)."),
    cutoff: int = typer.Option(256, "--cutoff", help="Maximum tokens per training text."),
    train_on_inputs: bool = typer.Option(True, "--train-on-inputs/--output-only", help="Loss on the whole text or only the output."),
    n_train: int | None = typer.Option(None, "--n-train", help="Use only the first n training rows."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, shuffling and dropout."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype: float32, bfloat16, float16."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: the loader's)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a LoRA-MoE with per-layer expert counts on MODEL and save it to --out."""
    from layerif.data import load_rows, select_rows
    from layerif.models import find_blocks, load_model
    from layerif.moe.pipeline import allocation_from_scores, train_adapter
    from layerif.moe.train import TrainConfig

    train_config = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, micro_batch_size=micro_batch_size,
        warmup=None if warmup is None else (int(warmup) if warmup >= 1 else warmup), cutoff=cutoff,
        train_on_inputs=train_on_inputs, seed=seed,
    )
    rows = select_rows(load_rows(train, split), n_train, what="training rows")
    loaded = load_model(model, dtype=dtype, device=device, quiet=quiet)
    n_layers = len(find_blocks(loaded.model)[1])
    result = allocation_from_scores(allocation, budget, beta, top_k, scores_dir=scores, score=score,
                                    n_layers=n_layers, model=loaded.model)
    moe_options = {"rank": rank, "alpha": alpha, "dropout": dropout, "modules": modules,
                   "load_balancing": load_balancing}
    log = train_adapter(loaded, rows, result, out, moe_options, train_config, model_name=model, quiet=quiet,
                        extra={"train": train, "n_train": len(rows)})
    typer.echo(f"trained {log['trainable_parameters']:,} parameters ({result.budget} experts over {n_layers} "
               f"layers) for {log['steps']} steps, final loss {log['final_loss']:.4f}; wrote {out}")


@moe_app.command("evaluate")
def moe_evaluate_command(
    test: str = typer.Option(..., "--test", help="Test rows with an `answer` field: JSONL/JSON/CSV file or dataset."),
    adapter: str | None = typer.Option(None, "--adapter", help="Adapter folder of `layerif moe train` (none: the base model)."),
    model: str | None = typer.Option(None, "--model", help="Base model (default: the one the adapter records)."),
    split: str | None = typer.Option(None, "--split", help="Split of a datasets dataset for --test."),
    method: str = typer.Option("loglik,generate", "--method", help="loglik and/or generate, comma separated."),
    labels: str | None = typer.Option(None, "--labels", help="Label set, comma separated (default: the distinct answers)."),
    n_test: int | None = typer.Option(None, "--n-test", help="Use only the first n test rows."),
    batch_size: int = typer.Option(16, "--batch-size", help="Rows per forward pass."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Generation length for --method generate."),
    out: str | None = typer.Option(None, "--out", help="eval.json path (default: ADAPTER/eval.json)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ..."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Accuracy (± standard error) of an adapted model on test rows, by label log-likelihood and/or generation."""
    from pathlib import Path

    from layerif.data import load_rows, select_rows
    from layerif.moe.pipeline import evaluate_adapter, load_for_eval

    if adapter is None and model is None:
        raise _error("give --adapter or --model")
    rows = select_rows(load_rows(test, split), n_test, what="test rows")
    loaded = load_for_eval(adapter, model, dtype=dtype, device=device, quiet=quiet)
    path = out or (str(Path(adapter) / "eval.json") if adapter else None)
    summary = evaluate_adapter(loaded, rows, path, [m.strip() for m in method.split(",") if m.strip()],
                               labels.split(",") if labels else None, batch_size, max_new_tokens=max_new_tokens,
                               quiet=quiet, extra={"adapter": adapter, "test": test, "n_test": len(rows)})
    for name, result in summary.items():
        typer.echo(f"{name}: accuracy {result['accuracy']:.4f} ± {result['stderr']:.4f} (n={result['n']})")
    if path:
        typer.echo(f"wrote {path}")
# ---- end LoRA-MoE commands ----


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    from layerif.errors import LayerIFError

    try:
        app(args=argv, standalone_mode=True)
    except LayerIFError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("LAYERIF_DEBUG"):
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (set LAYERIF_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
