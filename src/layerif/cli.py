"""Command line: `layerif score | demo | stability | allocate | prune | compare | evaluate | moe`. Thin: parse, call the API, print."""

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
_AGGREGATION_FLAGS = ("--aggregation", "--score")  # --score: the earlier name, kept working
_AGGREGATION_HELP = "Layer score aggregation: S_pos, S_top25 or S_all (also --score)."
_OVERWRITE_HELP = "Replace our earlier outputs in --out (files we did not write are always kept)."


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
    aggregation: str = typer.Option("S_pos", *_AGGREGATION_FLAGS, help=_AGGREGATION_HELP),
    no_smooth: bool = typer.Option(False, "--no-smooth", help="Skip the Savitzky-Golay (7, 3) smoothing."),
    model: str | None = typer.Option(None, "--model", help="Model whose block sizes weight the mean (needed for owl/alphapruning)."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration text for owl."),
    calib_sequences: int = typer.Option(128, "--calib-sequences", help="Calibration sequences (owl)."),
    calib_length: int | None = typer.Option(None, "--calib-length", help="Tokens per calibration sequence (default min(2048, context))."),
    out: str | None = typer.Option(None, "--out", help="Folder for ratios.json (default: the --scores folder)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the random allocation's placement."),
    quiet: bool = typer.Option(False, "--quiet", help="No table."),
) -> None:
    """Turn layer scores (or a baseline metric) into per-block pruning ratios; writes ratios.json."""
    from layerif.allocate.jobs import SparsityJob

    job = SparsityJob(sparsity=sparsity, scores=scores, allocation=allocation, epsilon=epsilon, score=aggregation,
                      smooth=not no_smooth, model=model, calib=calib, calib_sequences=calib_sequences,
                      calib_length=calib_length, out=out, overwrite=overwrite, quiet=quiet, seed=seed)
    plan, path = job.run()
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
    aggregation: str = typer.Option("S_pos", *_AGGREGATION_FLAGS, help=_AGGREGATION_HELP),
    no_smooth: bool = typer.Option(False, "--no-smooth", help="Skip the Savitzky-Golay (7, 3) smoothing."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration text (.txt, or JSONL/JSON/CSV rows)."),
    calib_sequences: int = typer.Option(128, "--calib-sequences", help="Calibration sequences."),
    calib_length: int | None = typer.Option(None, "--calib-length", help="Tokens per sequence (default min(2048, context))."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random calibration windows and of the random allocation."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration sequences per forward."),
    save_model: bool = typer.Option(False, "--save-model", help="Also save the pruned model (save_pretrained) into --out."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype (default: the checkpoint's)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: where the model loads)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or table."),
) -> None:
    """Prune MODEL's block matrices to per-block ratios with magnitude, Wanda or SparseGPT."""
    from pathlib import Path

    from layerif.prune.pipeline import PruneJob

    job = PruneJob(model=model, allocation=allocation, method=method, sparsity=sparsity, out=out, scores=scores,
                   score_name=aggregation, epsilon=epsilon, smooth=not no_smooth, calib=calib,
                   calib_sequences=calib_sequences, calib_length=calib_length, seed=seed, batch_size=batch_size,
                   save_model=save_model, dtype=dtype, device=device, quiet=quiet, overwrite=overwrite)
    plan, report = job.run()
    if not quiet:
        _print_ratios(plan, f"{method} with {plan.allocation} ratios")
    typer.echo(f"measured sparsity {report.overall:.4f} (largest per-matrix deviation {report.max_deviation:.2e}); "
               f"wrote {Path(out) / 'ratios.json'} and prune.json" + (" and the model" if save_model else ""))


compare_app = typer.Typer(no_args_is_help=True, help="Controlled comparisons of allocations, with seed-aware intervals.")
app.add_typer(compare_app, name="compare")


@compare_app.command("prune")
def compare_prune_command(
    model: str = typer.Option(..., "--model", help="Hub id, local model directory, .gguf file, or built-in name."),
    out: str = typer.Option(..., "--out", help="Folder for compare.json, compare.md, runs.csv, window_nll.csv (resumable)."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration text; its last --valid-windows windows choose ε unless --valid."),
    test: str | None = typer.Option(None, "--test", help="Test text (first --test-windows windows)."),
    scores: list[str] = typer.Option([], "--scores", help="`layerif score` run for layerif/reversed/random; LABEL=RUN adds one for `layerif@LABEL` (repeatable)."),
    method: str = typer.Option("wanda", "--method", help="magnitude, wanda or sparsegpt."),
    sparsity: float = typer.Option(..., "--sparsity", help="Target mean sparsity, inside (0, 1)."),
    allocations: str = typer.Option("layerif,depth,random,uniform", "--allocations",
                                    help="Comma list of layerif, depth, random, uniform, owl, alphapruning, reversed; "
                                         "layerif:S_top25 or layerif@LABEL for variants. The first is compared with all."),
    calib_seeds: int = typer.Option(3, "--calib-seeds", help="Calibration seeds (one pruned model each)."),
    random_seeds: int = typer.Option(3, "--random-seeds", help="Placements of the random control."),
    epsilon_grid: str = typer.Option("0.2,0.3,0.4,0.5", "--epsilon-grid", help="ε values tried on the validation windows."),
    valid: str | None = typer.Option(None, "--valid", help="Validation text (default: the held-out end of --calib)."),
    valid_windows: int = typer.Option(96, "--valid-windows", help="Validation windows that choose ε."),
    test_windows: int = typer.Option(200, "--test-windows", help="Test windows."),
    window_length: int = typer.Option(512, "--window-length", help="Tokens per validation/test window."),
    calib_sequences: int = typer.Option(128, "--calib-sequences", help="Calibration sequences per seed."),
    calib_length: int = typer.Option(512, "--calib-length", help="Tokens per calibration sequence."),
    block_windows: int = typer.Option(10, "--block-windows", help="Consecutive windows resampled together (about one article)."),
    resamples: int = typer.Option(10000, "--resamples", help="Bootstrap resamples."),
    aggregation: str = typer.Option("S_pos", "--score", help="Default layer score of the LayerIF allocations."),
    no_dense: bool = typer.Option(False, "--no-dense", help="Skip evaluating the dense model."),
    units: str | None = typer.Option(None, "--units", help="Folder that keeps finished units across comparisons (default: inside --out until it is published)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration sequences per forward."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype (default: the checkpoint's)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: where the model loads)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP + " Also discards finished units."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or table."),
) -> None:
    """Prune with each allocation over calibration seeds, choose ε on validation, and say which is better."""
    from layerif.compare import ComparePruneJob
    from layerif.compare.results import ratio_text

    job = ComparePruneJob(model=model, out=out, calib=calib, test=test, scores=tuple(scores), method=method,
                          sparsity=sparsity, allocations=allocations, calib_seeds=calib_seeds,
                          random_seeds=random_seeds, epsilon_grid=epsilon_grid, valid=valid,
                          valid_windows=valid_windows, test_windows=test_windows, window_length=window_length,
                          calib_sequences=calib_sequences, calib_length=calib_length, block_windows=block_windows,
                          resamples=resamples, score_name=aggregation, dense=not no_dense, units=units, batch_size=batch_size,
                          dtype=dtype, device=device, quiet=quiet, overwrite=overwrite)
    result = job.run()
    if not quiet:
        typer.echo(result.table().to_string(index=False))
    first = result.arms[0]["allocation"]
    for verdict in (v for v in result.verdicts if v["allocation"] == first):
        typer.echo(f"{first} vs {verdict['baseline']}: {verdict['reading']} ({ratio_text(verdict)})")
    typer.echo(f"wrote compare.json, compare.md, runs.csv and window_nll.csv to {out}")


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
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Perplexity and zero-shot accuracy (lm-evaluation-harness, local task files); writes eval.json."""
    from rich.console import Console
    from rich.table import Table

    from layerif.evaluate.run import EvalJob

    task_list = [task.strip() for task in tasks.split(",") if task.strip()] if tasks else None
    job = EvalJob(model=model, ppl=ppl, ppl_length=ppl_length, ppl_windows=ppl_windows, tasks=task_list,
                  data_dir=data_dir, limit=limit, batch_size=batch_size, out=out, dtype=dtype, device=device,
                  quiet=quiet, overwrite=overwrite)
    result, path = job.run()
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
    aggregation: str = typer.Option("S_pos", *_AGGREGATION_FLAGS, help=_AGGREGATION_HELP),
    allocation: str = typer.Option("layerif", "--allocation", help=_ALLOCATION_HELP),
    top_k: int | None = typer.Option(None, "--top-k", help="Experts per token: min(k, n_l) per layer (default k = 2)."),
    layers: int | None = typer.Option(None, "--layers", help="Number of layers (for uniform/MoLA without --scores)."),
    model: str | None = typer.Option(None, "--model", help="Model for alphalora (its PL_Alpha_Hill per block)."),
    out: str | None = typer.Option(None, "--out", help="Folder for experts.json (default: print the counts)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the random allocation's placement."),
) -> None:
    """Turn layer scores into LoRA experts per layer (exactly --budget in total, >= 1 per layer)."""
    from layerif.allocate.jobs import ExpertsJob

    job = ExpertsJob(scores=scores, budget=budget, beta=beta, score=aggregation, allocation=allocation, top_k=top_k,
                     layers=layers, model=model, out=out, overwrite=overwrite, seed=seed)
    result, path = job.run()
    if path is None:
        typer.echo(f"counts: {','.join(map(str, result.counts))}")
        typer.echo(f"top_k:  {','.join(map(str, result.top_k))}")
        typer.echo(f"total:  {result.budget} experts over {result.n_layers} layers")
    else:
        typer.echo(f"wrote {path}")


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
    aggregation: str = typer.Option("S_pos", *_AGGREGATION_FLAGS, help=_AGGREGATION_HELP),
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
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a LoRA-MoE with per-layer expert counts on MODEL and save it to --out."""
    from layerif.moe.pipeline import MoETrainJob

    job = MoETrainJob(model=model, train=train, out=out, split=split, allocation=allocation, scores=scores,
                      budget=budget, beta=beta, score=aggregation, top_k=top_k, rank=rank, alpha=alpha,
                      dropout=dropout, modules=modules, load_balancing=load_balancing, epochs=epochs, lr=lr,
                      batch_size=batch_size, micro_batch_size=micro_batch_size, max_memory=max_memory,
                      warmup=warmup, cutoff=cutoff,
                      train_on_inputs=train_on_inputs, n_train=n_train, seed=seed, dtype=dtype, device=device,
                      quiet=quiet, overwrite=overwrite)
    log, result, n_layers = job.run()
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
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Accuracy (± standard error) of an adapted model on test rows, by label log-likelihood and/or generation."""
    from layerif.evaluate.adapters import MoEEvalJob

    job = MoEEvalJob(test=test, adapter=adapter, model=model, split=split,
                     methods=tuple(m.strip() for m in method.split(",") if m.strip()),
                     labels=labels.split(",") if labels else None, n_test=n_test, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, out=out, dtype=dtype, device=device, quiet=quiet,
                     overwrite=overwrite)
    summary, path = job.run()
    for name, result in summary.items():
        typer.echo(f"{name}: accuracy {result['accuracy']:.4f} ± {result['stderr']:.4f} (n={result['n']})")
    if path is not None:
        typer.echo(f"wrote {path}")
# ---- end LoRA-MoE commands ----


# ---- report and export commands (layerif report, layerif export peft, layerif export sparsity) ----
export_app = typer.Typer(no_args_is_help=True, help="Write an allocation in the form other tools take (PEFT, pruning).")
app.add_typer(export_app, name="export")


def _refuse_existing(out: str, overwrite: bool) -> None:
    from pathlib import Path

    from layerif.errors import LayerIFError

    if Path(out).is_dir():
        raise LayerIFError(f"--out {out} is a directory; give a file name")
    if Path(out).exists() and not overwrite:
        raise LayerIFError(f"--out {out} already exists; pass --overwrite to replace it")


@app.command("report")
def report_command(
    runs: list[str] = typer.Argument(..., help="Run folders written by `layerif score` (one per task or setting)."),
    out: str = typer.Option(..., "--out", help="HTML file to write, e.g. report.html (self-contained, opens offline)."),
    budget: int | None = typer.Option(None, "--budget", help="Total experts for the expert allocations (default 5 x blocks)."),
    beta: float = typer.Option(2.5, "--beta", help="Exponent beta of the expert allocations."),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Target mean sparsity of the pruning allocations."),
    epsilon: float = typer.Option(0.3, "--epsilon", help="Spread of the pruning ratio map."),
    score: str = typer.Option("S_pos", "--score", help="Layer score the allocations and comparisons use."),
    model: str | None = typer.Option(None, "--model", help="The scored model: adds AlphaLoRA, AlphaPruning (and OWL with --calib)."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration text for OWL (needs --model)."),
    calib_sequences: int = typer.Option(128, "--calib-sequences", help="Calibration sequences (OWL)."),
) -> None:
    """One HTML page per study: profiles, intervals, module shares, allocations, and cross-task similarity."""
    from layerif.report.html import ReportOptions, build_report, model_inputs

    options = ReportOptions(budget=budget, beta=beta, sparsity=sparsity, epsilon=epsilon, score=score)
    options.validate()
    path = build_report(runs, out, options, model_inputs(model, calib, calib_sequences))
    typer.echo(f"wrote {path}")


@export_app.command("peft")
def export_peft_command(
    scores: str = typer.Option(..., "--scores", help="Run folder of `layerif score`."),
    total_rank: int = typer.Option(..., "--total-rank", help="Sum of the per-block LoRA ranks (>= number of blocks)."),
    out: str = typer.Option(..., "--out", help="JSON file of LoraConfig keyword arguments."),
    beta: float = typer.Option(2.5, "--beta", help="Exponent beta > 0 applied to the scores."),
    score: str = typer.Option("S_pos", "--score", help="Layer score: S_pos, S_top25 or S_all."),
    alpha_ratio: float = typer.Option(2.0, "--alpha-ratio", help="lora_alpha = ratio x rank for every module."),
    dropout: float = typer.Option(0.05, "--dropout", help="lora_dropout."),
    blocks_path: str | None = typer.Option(None, "--blocks-path", help="Prefix of the block list, e.g. model.layers (default: the run's record, else keys like 3.self_attn.q_proj)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """A PEFT LoraConfig whose rank_pattern gives each block's matrices a LayerIF-allocated rank."""
    from layerif.export import lora_ranks, peft_lora_config, recorded_blocks_path, write_peft_config
    from layerif.scores import LayerScores

    _refuse_existing(out, overwrite)
    loaded = LayerScores.load(scores)
    blocks_path = blocks_path or recorded_blocks_path(scores)
    config = peft_lora_config(loaded, total_rank, beta, score, alpha_ratio, dropout, blocks_path)
    path = write_peft_config(config, out)
    typer.echo(f"ranks per block: {','.join(map(str, lora_ranks(loaded, total_rank, beta, score)))}")
    typer.echo(f"wrote {path} (LoraConfig(**json.load(open({str(path)!r}))))")


@export_app.command("sparsity")
def export_sparsity_command(
    ratios: str = typer.Option(..., "--ratios", help="ratios.json written by `layerif allocate sparsity` or `layerif prune`."),
    out: str = typer.Option(..., "--out", help="File to write."),
    fmt: str = typer.Option("yaml", "--format", help="yaml, json or csv."),
    blocks_path: str | None = typer.Option(None, "--blocks-path", help="Rename the blocks.<l> prefix of ratios made without --model, e.g. model.layers."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Per-module sparsity map (module name -> ratio) and the per-block list, for pruning toolkits."""
    from layerif.export import write_sparsity

    _refuse_existing(out, overwrite)
    typer.echo(f"wrote {write_sparsity(ratios, fmt, out, blocks_path)}")
# ---- end report and export commands ----


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (the output folder keeps what an interrupted run keeps)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _interrupted_line(argv: list[str]) -> str:
    import shlex

    from layerif.outdir import last_interrupted

    command = shlex.join(["layerif", *argv])
    if last_interrupted.get("kept"):
        return (f"interrupted: finished work kept in {last_interrupted['kept']}; "
                f"run the same command again to resume: {command}")
    return f"interrupted: nothing was written; run the command again to start over: {command}"


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    import signal
    import threading

    from layerif.errors import LayerIFError
    from layerif.outdir import last_interrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    last_interrupted.clear()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app(args=argv, standalone_mode=True)
    except LayerIFError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        typer.echo(_interrupted_line(argv), err=True)
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    except SystemExit as exc:  # typer turns Ctrl-C into a silent exit 130: say what was kept
        interrupt = _interrupt_behind(exc)
        if interrupt is None:
            raise
        typer.echo(_interrupted_line(argv), err=True)
        sys.exit(143 if isinstance(interrupt, Terminated) else 130)
    except Exception as exc:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("LAYERIF_DEBUG"):
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (set LAYERIF_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
