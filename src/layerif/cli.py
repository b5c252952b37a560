"""Command line: `layerif score | demo | stability | allocate | prune | evaluate | moe`. Thin: parse, call the API, print."""

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


# ---- scoring commands (layerif score, layerif demo, layerif stability) ----
from layerif.args import ScoreConfig, config_options  # noqa: E402  (the options of these commands come from its fields)


def _report_left_out(scores) -> None:
    left_out = scores.metadata.get("left_out") or {}
    for which, samples in left_out.items():
        if samples:
            listed = "; ".join(f"{which} sample {k}: {v}" for k, v in list(samples.items())[:5])
            more = f" (and {len(samples) - 5} more)" if len(samples) > 5 else ""
            typer.echo(f"warning: left out {len(samples)} {which} sample(s) with non-finite loss or gradient: "
                       f"{listed}{more}; see run.json", err=True)


@app.command()
@config_options()
def score(
    model: str = typer.Option(..., "--model", help="Hub id, local model directory, .gguf file, or built-in name (smollm2-135m)."),
    train: str = typer.Option(..., "--train", help="Training data: JSONL/JSON/CSV file, or dataset name with --train-split."),
    val: str = typer.Option(..., "--val", help="Validation data: JSONL/JSON/CSV file, or dataset name with --val-split."),
    out: str = typer.Option(..., "--out", help="Output directory for the run."),
    gguf_file: str | None = typer.Option(None, "--gguf-file", help="GGUF file name inside --model's directory."),
    train_split: str | None = typer.Option(None, "--train-split", help="Split of a datasets dataset for --train."),
    val_split: str | None = typer.Option(None, "--val-split", help="Split of a datasets dataset for --val."),
    spill_dir: str | None = typer.Option(None, "--spill-dir", help="Where spilled gradient factors go (default: inside --out)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype: float32, bfloat16, float16 (default: the checkpoint's)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    device_map: str | None = typer.Option(None, "--device-map", help="e.g. auto: spread a model too large for one device."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    config: ScoreConfig = None,
) -> None:
    """Score every block of MODEL with LayerIF on your train/validation data."""
    from layerif.report.tables import print_layer_table
    from layerif.runs import ScoreRun, describe, run_score

    run = ScoreRun(model=model, train=train, val=val, out=out, gguf_file=gguf_file, train_split=train_split,
                   val_split=val_split, dtype=dtype, device=device, device_map=device_map, overwrite=overwrite,
                   spill_dir=spill_dir, config=config)
    scores, path = run_score(run)
    from layerif.distributed import current

    if not current().is_main:  # data-parallel: rank 0 reports
        return
    _report_left_out(scores)
    if not config.quiet:
        print_layer_table(scores, title=f"LayerIF layer scores ({config.estimator}, {config.params} space, "
                                        f"{config.modules} modules)")
    typer.echo(describe(path))


@app.command()
@config_options(only=("n_train", "n_val", "batch_size", "bootstrap", "quiet"), defaults={"n_train": 120, "n_val": 30})
def demo(
    model: str = typer.Option("smollm2-135m", "--model", help="Model to score (default: the built-in SmolLM2-135M)."),
    task: str = typer.Option("facts", "--task", help="Built-in demo task: facts, capitals or arithmetic."),
    out: str = typer.Option("runs/demo", "--out", help="Output directory."),
    config: ScoreConfig = None,
) -> None:
    """Score the built-in model on a built-in task and print the per-layer table (replaces --out)."""
    from layerif.report.tables import print_layer_table
    from layerif.runs import ScoreRun, describe, run_score

    run = ScoreRun(model=model, train=None, val=None, out=out, overwrite=True, demo_task=task, config=config)
    scores, path = run_score(run)
    print_layer_table(scores, title=f"LayerIF layer scores — {model} on the built-in '{task}' task")
    typer.echo(describe(path))


@app.command()
@config_options(exclude=("n_train", "n_val", "sample_seed"))
def stability(
    model: str = typer.Option(..., "--model", help="Hub id, local model directory, .gguf file, or built-in name (smollm2-135m)."),
    train: str = typer.Option(..., "--train", help="Training data: JSONL/JSON/CSV file, or dataset name with --train-split."),
    val: str = typer.Option(..., "--val", help="Validation data: JSONL/JSON/CSV file, or dataset name with --val-split."),
    out: str = typer.Option(..., "--out", help="Output directory for stability.json, stability.csv and split_<k>/."),
    splits: int = typer.Option(2, "--splits", help="Number K of disjoint train/validation splits (>= 2)."),
    n_train: int = typer.Option(..., "--n-train", help="Training rows per split (the data needs K x n_train rows)."),
    n_val: int = typer.Option(..., "--n-val", help="Validation rows per split (the data needs K x n_val rows)."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the shuffle that deals the rows into splits."),
    train_split: str | None = typer.Option(None, "--train-split", help="Split of a datasets dataset for --train."),
    val_split: str | None = typer.Option(None, "--val-split", help="Split of a datasets dataset for --val."),
    gguf_file: str | None = typer.Option(None, "--gguf-file", help="GGUF file name inside --model's directory."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype: float32, bfloat16, float16 (default: the checkpoint's)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing result in --out."),
    config: ScoreConfig = None,
) -> None:
    """Score K disjoint splits of the data and report how well their layer profiles agree."""
    from layerif.scores import AGGREGATIONS
    from layerif.stability import StabilityRun, run_stability

    run = StabilityRun(model=model, train=train, val=val, out=out, splits=splits, n_train=n_train, n_val=n_val,
                       split_seed=split_seed, train_split=train_split, val_split=val_split, gguf_file=gguf_file,
                       dtype=dtype, device=device, overwrite=overwrite, config=config)
    result, path = run_stability(run)
    for how in AGGREGATIONS:
        typer.echo(result.sentence(how))
    typer.echo(f"wrote stability.json, stability.csv and split_0..split_{splits - 1} to {path}")


# ---- end scoring commands ----


# ---- pruning commands (layerif allocate sparsity, layerif prune, layerif evaluate) ----
_SPARSITY_ALLOCATIONS = ("layerif, reversed, uniform, owl, alphapruning, depth (block index as the score), random "
                         "(layerif permuted across blocks by --seed), or a JSON file with one ratio per block")


def _print_ratios(plan, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("block", justify="right")
    if plan.metric is not None:
        table.add_column(plan.metric_name or "metric", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("params", justify="right")
    for block, ratio in enumerate(plan.block_ratios):
        metric = [f"{plan.metric[block]:.4g}"] if plan.metric is not None else []
        table.add_row(str(block), *metric, f"{ratio:.4f}", f"{plan.block_params[block]:,}")
    Console().print(table)
    clipped = f"; clipped at 0.99 and re-balanced: blocks {plan.clipped}" if plan.clipped else ""
    typer.echo(f"mean sparsity (parameter-weighted): {plan.mean_sparsity:.6f}{clipped}")


@allocate_app.command("sparsity")
def allocate_sparsity_command(
    sparsity: float = typer.Option(..., "--sparsity", help="Target parameter-weighted mean sparsity, inside (0, 1)."),
    scores: str | None = typer.Option(None, "--scores", help="Run folder of `layerif score` (for layerif/reversed)."),
    allocation: str = typer.Option("layerif", "--allocation", help=_SPARSITY_ALLOCATIONS),
    epsilon: float = typer.Option(0.3, "--epsilon", help="Spread of the linear map: ratios span (1 ± ε) before rescaling."),
    score: str = typer.Option("S_pos", "--score", help="Layer score: S_pos, S_top25 or S_all."),
    no_smooth: bool = typer.Option(False, "--no-smooth", help="Skip the Savitzky-Golay (7, 3) smoothing."),
    model: str | None = typer.Option(None, "--model", help="Model whose block sizes weight the mean (needed for owl/alphapruning)."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration text for owl."),
    calib_sequences: int = typer.Option(128, "--calib-sequences", help="Calibration sequences (owl)."),
    calib_length: int | None = typer.Option(None, "--calib-length", help="Tokens per calibration sequence (default min(2048, context))."),
    out: str | None = typer.Option(None, "--out", help="Folder for ratios.json (default: the --scores folder)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random allocation's placement."),
    quiet: bool = typer.Option(False, "--quiet", help="No table."),
) -> None:
    """Turn layer scores (or a baseline metric) into per-block pruning ratios; writes ratios.json."""
    from pathlib import Path

    from layerif.allocate.sparsity import (
        allocate_from_scores,
        allocate_sparsity,
        check_epsilon,
        check_sparsity,
    )
    from layerif.errors import LayerIFError
    from layerif.scores import LayerScores

    check_sparsity(sparsity)
    check_epsilon(epsilon)
    if out is None and scores is None:
        raise LayerIFError("pass --out (or --scores, whose folder then receives ratios.json)")
    loaded_scores = LayerScores.load(scores) if scores is not None else None
    if model is None:
        if allocation not in ("layerif", "reversed", "random", "depth"):
            raise LayerIFError(f"--allocation {allocation} needs --model")
        if loaded_scores is None:
            raise LayerIFError(f"--allocation {allocation} needs --scores")
        plan = allocate_from_scores(loaded_scores, sparsity, epsilon, score, not no_smooth, allocation=allocation,
                                    seed=seed)
    else:
        from layerif.calibration import calibration_ids, default_length
        from layerif.models import load_model

        loaded = load_model(model, quiet=True)
        calib_ids = None
        if allocation == "owl":
            if calib is None:
                raise LayerIFError("--allocation owl needs --calib")
            calib_ids = calibration_ids(calib, loaded.tokenizer, calib_sequences,
                                        calib_length or default_length(loaded.model))
        plan = allocate_sparsity(loaded.model, allocation, sparsity, scores=loaded_scores, score_name=score,
                                 epsilon=epsilon, smooth_scores=not no_smooth, calib_ids=calib_ids, quiet=quiet,
                                 seed=seed)
    path = plan.save(Path(out if out is not None else scores) / "ratios.json")
    if not quiet:
        _print_ratios(plan, f"{plan.allocation} sparsity ratios (target {sparsity})")
    typer.echo(f"wrote {path}")


@app.command("prune")
def prune_command(
    model: str = typer.Option(..., "--model", help="Hub id, local model directory, .gguf file, or built-in name."),
    method: str = typer.Option("wanda", "--method", help="magnitude, wanda or sparsegpt."),
    sparsity: float = typer.Option(..., "--sparsity", help="Target parameter-weighted mean sparsity, inside (0, 1)."),
    out: str = typer.Option(..., "--out", help="Folder for ratios.json, prune.json (and the model with --save-model)."),
    allocation: str = typer.Option("uniform", "--allocation", help=_SPARSITY_ALLOCATIONS),
    scores: str | None = typer.Option(None, "--scores", help="Run folder of `layerif score` (for layerif/reversed)."),
    epsilon: float = typer.Option(0.3, "--epsilon", help="Spread ε of the linear map (layerif, reversed, alphapruning)."),
    score: str = typer.Option("S_pos", "--score", help="Layer score: S_pos, S_top25 or S_all."),
    no_smooth: bool = typer.Option(False, "--no-smooth", help="Skip the Savitzky-Golay (7, 3) smoothing."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration text (.txt, or JSONL/JSON/CSV rows)."),
    calib_sequences: int = typer.Option(128, "--calib-sequences", help="Calibration sequences."),
    calib_length: int | None = typer.Option(None, "--calib-length", help="Tokens per sequence (default min(2048, context))."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random calibration windows and of the random allocation."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration sequences per forward."),
    save_model: bool = typer.Option(False, "--save-model", help="Also save the pruned model (save_pretrained) into --out."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype (default: the checkpoint's)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: where the model loads)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or table."),
) -> None:
    """Prune MODEL's block matrices to per-block ratios with magnitude, Wanda or SparseGPT."""
    from pathlib import Path

    from layerif.prune.pipeline import PruneJob, run_prune

    job = PruneJob(model=model, allocation=allocation, method=method, sparsity=sparsity, out=out, scores=scores,
                   score_name=score, epsilon=epsilon, smooth=not no_smooth, calib=calib,
                   calib_sequences=calib_sequences, calib_length=calib_length, seed=seed, batch_size=batch_size,
                   save_model=save_model, dtype=dtype, device=device, quiet=quiet)
    plan, report = run_prune(job)
    if not quiet:
        _print_ratios(plan, f"{method} with {plan.allocation} ratios")
    typer.echo(f"measured sparsity {report.overall:.4f} (largest per-matrix deviation {report.max_deviation:.2e}); "
               f"wrote {Path(out) / 'ratios.json'} and prune.json" + (" and the model" if save_model else ""))


@app.command("evaluate")
def evaluate_command(
    model: str = typer.Option(..., "--model", help="Model folder (e.g. a pruned --out), hub id, .gguf or built-in name."),
    ppl: str | None = typer.Option(None, "--ppl", help="Text file for perplexity (e.g. WikiText-2 test.txt)."),
    ppl_length: int | None = typer.Option(None, "--ppl-length", help="Window length (default min(2048, context))."),
    ppl_windows: int | None = typer.Option(None, "--ppl-windows", help="Score only the first N windows."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma list of task names or JSONL files, e.g. boolq,arc_easy,rte."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder holding zeroshot/<task>/test.jsonl and moe/<task>/."),
    limit: int | None = typer.Option(None, "--limit", help="First N rows of each task."),
    batch_size: int = typer.Option(16, "--batch-size", help="Requests per forward."),
    out: str | None = typer.Option(None, "--out", help="Folder for eval.json (default: --model when it is a folder)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype (default: the checkpoint's)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ..."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Perplexity and zero-shot accuracy (lm-evaluation-harness, local task files); writes eval.json."""
    from rich.console import Console
    from rich.table import Table

    from layerif.evaluate.run import EvalJob, run_evaluate

    task_list = [task.strip() for task in tasks.split(",") if task.strip()] if tasks else None
    job = EvalJob(model=model, ppl=ppl, ppl_length=ppl_length, ppl_windows=ppl_windows, tasks=task_list,
                  data_dir=data_dir, limit=limit, batch_size=batch_size, out=out, dtype=dtype, device=device,
                  quiet=quiet)
    result, path = run_evaluate(job)
    table = Table(title=f"evaluation of {model}")
    for column in ("measure", "value", "stderr", "n"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    if "perplexity" in result:
        p = result["perplexity"]
        table.add_row("perplexity", f"{p['perplexity']:.2f}", "", f"{p['windows']}×{p['length']}")
    if "zeroshot" in result:
        for name, entry in result["zeroshot"]["tasks"].items():
            table.add_row(f"{name} acc", f"{entry['acc']:.4f}", f"{entry['acc_stderr']:.4f}", str(entry["n"]))
        z = result["zeroshot"]
        table.add_row("mean acc", f"{z['mean_acc']:.4f}", f"{z['mean_acc_stderr']:.4f}", "")
    Console().print(table)
    if path is not None:
        typer.echo(f"wrote {path}")


# ---- end pruning commands ----


# ---- LoRA-MoE commands (layerif allocate experts, layerif moe train, layerif moe evaluate) ----
_ALLOCATION_HELP = ("layerif, reversed, uniform, mola-2468, mola-8642, mola-5555, alphalora, depth (layer index "
                    "as the score), random (layerif counts permuted by --seed), or a comma list of counts per layer")


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
    seed: int = typer.Option(0, "--seed", help="Seed of the random allocation's placement."),
) -> None:
    """Turn layer scores into LoRA experts per layer (exactly --budget in total, >= 1 per layer)."""
    from layerif.moe.pipeline import allocation_from_scores

    loaded_model = None
    if allocation == "alphalora":
        if model is None:
            raise _error("--allocation alphalora needs --model")
        from layerif.models import load_model

        loaded_model = load_model(model, quiet=True).model
    if layers is None and scores is not None and allocation not in ("layerif", "reversed", "random"):
        from layerif.scores import LayerScores

        layers = LayerScores.load(scores).n_layers
    result = allocation_from_scores(allocation, budget, beta, top_k, scores_dir=scores, score=score,
                                    n_layers=layers, model=loaded_model, seed=seed)
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
    micro_batch_size: int | None = typer.Option(None, "--micro-batch-size", help="Rows per forward (gradient accumulation); default: the largest that fits --max-memory."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Activation memory budget of one micro-batch, e.g. 4GiB (default: half the free memory)."),
    warmup: float | None = typer.Option(None, "--warmup", help="Warm-up steps (>= 1) or fraction (< 1); default min(100, 10 %)."),
    cutoff: int = typer.Option(256, "--cutoff", help="Maximum tokens per training text."),
    train_on_inputs: bool = typer.Option(True, "--train-on-inputs/--output-only", help="Loss on the whole text or only the output."),
    n_train: int | None = typer.Option(None, "--n-train", help="Use only the first n training rows."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, shuffling, dropout and the random allocation."),
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
        epochs=epochs, lr=lr, batch_size=batch_size, micro_batch_size=micro_batch_size, max_memory=max_memory,
        warmup=None if warmup is None else (int(warmup) if warmup >= 1 else warmup), cutoff=cutoff,
        train_on_inputs=train_on_inputs, seed=seed,
    )
    rows = select_rows(load_rows(train, split), n_train, what="training rows")
    loaded = load_model(model, dtype=dtype, device=device, quiet=quiet)
    n_layers = len(find_blocks(loaded.model)[1])
    result = allocation_from_scores(allocation, budget, beta, top_k, scores_dir=scores, score=score,
                                    n_layers=n_layers, model=loaded.model, seed=seed)
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
