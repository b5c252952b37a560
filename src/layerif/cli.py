"""Command line: `layerif score | demo | stability | allocate | prune | compare | evaluate | moe | report | export`.

Thin: each command's options are generated from its job's fields (`layerif.options`, and `layerif.args` for
the scoring options); its body runs the job and prints what came back.
"""

from __future__ import annotations

import os
import sys

import typer

from layerif.allocate.jobs import ExpertsJob, SparsityJob
from layerif.args import config_options
from layerif.compare.moe import CompareMoEJob
from layerif.compare.prune import ComparePruneJob
from layerif.evaluate.adapters import MoEEvalJob
from layerif.evaluate.run import EvalJob
from layerif.export import PeftExportJob, SparsityExportJob
from layerif.moe.pipeline import MoETrainJob
from layerif.options import (
    EXPERT_ALLOCATIONS,
    OVERWRITE_HELP,
    SPARSITY_ALLOCATIONS,
    Option,
    comma_list,
    job_options,
)
from layerif.prune.pipeline import PruneJob
from layerif.report.job import ReportJob
from layerif.runs import ScoreRun
from layerif.stability import StabilityRun

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LayerIF: data-driven layer quality scores for language models, and their uses.")
allocate_app = typer.Typer(no_args_is_help=True, help="Turn layer scores into per-layer expert counts or sparsities.")
moe_app = typer.Typer(no_args_is_help=True, help="Train and evaluate LoRA-MoE adapters with per-layer expert counts.")
compare_app = typer.Typer(no_args_is_help=True, help="Controlled comparisons of allocations, with seed-aware intervals.")
export_app = typer.Typer(no_args_is_help=True, help="Write an allocation in the form other tools take (PEFT, pruning).")
app.add_typer(allocate_app, name="allocate")
app.add_typer(moe_app, name="moe")
app.add_typer(compare_app, name="compare")
app.add_typer(export_app, name="export")


# ---- scoring commands (layerif score, layerif demo, layerif stability) ----
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
@job_options(ScoreRun, exclude=("config", "demo_task"), own={
    "out": Option("Output directory for the run."),
    "spill_dir": Option("Where spilled gradient factors go (default: inside --out)."),
    "device_map": Option("e.g. auto: spread a model too large for one device."),
    "overwrite": Option("Replace an existing run in --out.")})
def score(job: ScoreRun) -> None:
    """Score every block of MODEL with LayerIF on your train/validation data."""
    from layerif.distributed import current
    from layerif.report.tables import print_layer_table
    from layerif.runs import describe, run_score

    scores, path = run_score(job)
    if not current().is_main:  # data-parallel: rank 0 reports
        return
    _report_left_out(scores)
    config = job.config
    if not config.quiet:
        print_layer_table(scores, title=f"LayerIF layer scores ({config.estimator}, {config.params} space, "
                                        f"{config.modules} modules)")
    typer.echo(describe(path))


@app.command()
@config_options(only=("n_train", "n_val", "batch_size", "bootstrap", "quiet"), defaults={"n_train": 120, "n_val": 30})
@job_options(ScoreRun, exclude=("config", "gguf_file", "train_split", "val_split", "dtype", "device", "device_map",
                                "spill_dir"), fixed={"train": None, "val": None, "overwrite": True}, own={
    "model": Option("Model to score (default: the built-in SmolLM2-135M).", default="smollm2-135m"),
    "demo_task": Option("Built-in demo task: facts, capitals or arithmetic.", ("--task",), default="facts"),
    "out": Option("Output directory.", default="runs/demo")})
def demo(job: ScoreRun) -> None:
    """Score the built-in model on a built-in task and print the per-layer table (replaces --out)."""
    from layerif.report.tables import print_layer_table
    from layerif.runs import describe, run_score

    scores, path = run_score(job)
    print_layer_table(scores, title=f"LayerIF layer scores — {job.model} on the built-in '{job.demo_task}' task")
    typer.echo(describe(path))


@app.command()
@config_options(exclude=("n_train", "n_val", "sample_seed"))
@job_options(StabilityRun, exclude=("config",), defaults={"n_train": ..., "n_val": ...}, own={
    "out": Option("Output directory for stability.json, stability.csv and split_<k>/."),
    "splits": Option("Number K of disjoint train/validation splits (>= 2)."),
    "n_train": Option("Training rows per split (the data needs K x n_train rows)."),
    "n_val": Option("Validation rows per split (the data needs K x n_val rows)."),
    "split_seed": Option("Seed of the shuffle that deals the rows into splits."),
    "overwrite": Option("Replace an existing result in --out.")})
def stability(job: StabilityRun) -> None:
    """Score K disjoint splits of the data and report how well their layer profiles agree."""
    from layerif.scores import AGGREGATIONS
    from layerif.stability import run_stability

    result, path = run_stability(job)
    for how in AGGREGATIONS:
        typer.echo(result.sentence(how))
    typer.echo(f"wrote stability.json, stability.csv and split_0..split_{job.splits - 1} to {path}")


# ---- pruning commands (layerif allocate sparsity, layerif prune, layerif compare prune, layerif evaluate) ----
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
@job_options(SparsityJob, own={
    "allocation": Option(SPARSITY_ALLOCATIONS),
    "model": Option("Model whose block sizes weight the mean (needed for owl/alphapruning)."),
    "calib": Option("Calibration text for owl."),
    "calib_sequences": Option("Calibration sequences (owl)."),
    "out": Option("Folder for ratios.json (default: the --scores folder)."),
    "seed": Option("Seed of the random allocation's placement."),
    "quiet": Option("No table.")})
def allocate_sparsity_command(job: SparsityJob) -> None:
    """Turn layer scores (or a baseline metric) into per-block pruning ratios; writes ratios.json."""
    plan, path = job.run()
    if not job.quiet:
        _print_ratios(plan, f"{plan.allocation} sparsity ratios (target {job.sparsity})")
    typer.echo(f"wrote {path}")


@app.command("prune")
@job_options(PruneJob, defaults={"allocation": "uniform"}, own={
    "allocation": Option(SPARSITY_ALLOCATIONS),
    "out": Option("Folder for ratios.json, prune.json (and the model with --save-model)."),
    "epsilon": Option("Spread ε of the linear map (layerif, reversed, alphapruning)."),
    "seed": Option("Seed of the random calibration windows and of the random allocation."),
    "batch_size": Option("Calibration sequences per forward."),
    "save_model": Option("Also save the pruned model (save_pretrained) into --out.")})
def prune_command(job: PruneJob) -> None:
    """Prune MODEL's block matrices to per-block ratios with magnitude, Wanda or SparseGPT."""
    from pathlib import Path

    plan, report = job.run()
    if not job.quiet:
        _print_ratios(plan, f"{job.method} with {plan.allocation} ratios")
    typer.echo(f"measured sparsity {report.overall:.4f} (largest per-matrix deviation {report.max_deviation:.2e}); "
               f"wrote {Path(job.out) / 'ratios.json'} and prune.json" + (" and the model" if job.save_model else ""))


@compare_app.command("prune")
@job_options(ComparePruneJob, exclude=("eval_batch_size", "on_unit"), defaults={"sparsity": ...}, own={
    "out": Option("Folder for compare.json, compare.md, runs.csv, window_nll.csv (resumable)."),
    "calib": Option("Calibration text; its last --valid-windows windows choose ε unless --valid."),
    "test": Option("Test text (first --test-windows windows)."),
    "scores": Option("`layerif score` run for layerif/reversed/random; LABEL=RUN adds one for `layerif@LABEL` "
                     "(repeatable).", to_job=tuple, cli_type=list[str], default=[]),
    "sparsity": Option("Target mean sparsity, inside (0, 1)."),
    "allocations": Option("Comma list of layerif, depth, random, uniform, owl, alphapruning, reversed; "
                          "layerif:S_top25 or layerif@LABEL for variants. The first is compared with all."),
    "calib_seeds": Option("Calibration seeds (one pruned model each)."),
    "random_seeds": Option("Placements of the random control."),
    "epsilon_grid": Option("ε values tried on the validation windows.", cli_type=str),
    "valid": Option("Validation text (default: the held-out end of --calib)."),
    "valid_windows": Option("Validation windows that choose ε."),
    "test_windows": Option("Test windows."),
    "window_length": Option("Tokens per validation/test window."),
    "calib_sequences": Option("Calibration sequences per seed."),
    "calib_length": Option("Tokens per calibration sequence."),
    "block_windows": Option("Consecutive windows resampled together (about one article)."),
    "resamples": Option("Bootstrap resamples."),
    "score_name": Option("Default layer score of the LayerIF allocations.", ("--score",)),
    "dense": Option("Skip evaluating the dense model.", ("--no-dense",), lambda skip: not skip, bool, False),
    "zeroshot": Option("Comma list of zero-shot tasks (names under --data-dir or JSONL files) scored on each "
                       "allocation's first run and the dense model."),
    "data_dir": Option("Folder holding zeroshot/<task>/test.jsonl and moe/<task>/ (for task names)."),
    "zeroshot_limit": Option("First N rows of each zero-shot task."),
    "zeroshot_batch_size": Option("Zero-shot requests per forward."),
    "units": Option("Folder that keeps finished units across comparisons (default: inside --out until it is "
                    "published)."),
    "batch_size": Option("Calibration sequences per forward."),
    "overwrite": Option(OVERWRITE_HELP + " Also discards finished units.")})
def compare_prune_command(job: ComparePruneJob) -> None:
    """Prune with each allocation over calibration seeds, choose ε on validation, and say which is better."""
    from layerif.compare.results import edge_text, ratio_text

    result = job.run()
    if not job.quiet:
        typer.echo(result.table().to_string(index=False))
    first = result.arms[0]["allocation"]
    for verdict in (v for v in result.verdicts if v["allocation"] == first):
        typer.echo(f"{first} vs {verdict['baseline']}: {verdict['reading']} ({ratio_text(verdict)})")
    if (warning := edge_text(result)) is not None:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"wrote compare.json, compare.md, runs.csv and window_nll.csv to {job.out}")


@compare_app.command("moe")
@job_options(CompareMoEJob, exclude=("on_unit", "eval_batch_size"), own={
    "task": Option("Task folder with train.jsonl, validation.jsonl (scores, curve) and test.jsonl."),
    "out": Option("Folder for compare.json, compare.md, runs.csv, row_correct.csv (resumable)."),
    "allocations": Option("Comma list of layerif, depth, random, uniform, reversed, alphalora, mola-2468, "
                          "mola-8642, mola-5555, plain-lora; layerif:S_top25 for another score. The first is "
                          "compared with all."),
    "seeds": Option("Training seeds (one adapter each; run k of every allocation uses seed k)."),
    "steps": Option("Optimizer steps of every training run."),
    "budget": Option("Total experts T over all layers (default 5 per layer)."),
    "rank": Option("Rank of every LoRA expert."),
    "alpha": Option("LoRA alpha (plain-lora keeps alpha / rank)."),
    "dropout": Option("Dropout on the expert input."),
    "modules": Option("attn | mlp | all: which projections of a block get experts."),
    "lr": Option("Peak AdamW learning rate."),
    "batch_size": Option("Rows per optimizer step."),
    "micro_batch_size": Option("Rows per forward (default: the largest that fits --max-memory)."),
    "max_memory": Option("Activation memory budget of one micro-batch, e.g. 4GiB (default: half the free memory)."),
    "cutoff": Option("Maximum tokens per training row."),
    "train_on_inputs": Option("Loss on the whole text instead of the answer tokens only."),
    "n_train": Option("First N training rows (default all)."),
    "n_test": Option("First N test rows."),
    "scores": Option("`layerif score` run for layerif/reversed/random/depth (default: score the task's own rows)."),
    "score_name": Option("Default layer score of the LayerIF allocations.", ("--score",)),
    "score_train": Option("Training rows scored when --scores is not given."),
    "score_val": Option("Validation rows scored when --scores is not given."),
    "curve_every": Option("First a validation curve of the uniform MoE (seed 0): accuracy every N steps."),
    "n_val": Option("Validation rows of the curve."),
    "screen_only": Option("Stop after the curve and its constant-label screen (needs --curve-every)."),
    "base": Option("Skip scoring the base model on the test rows.", ("--no-base",), lambda skip: not skip, bool,
                   False),
    "resamples": Option("Bootstrap resamples."),
    "units": Option("Folder that keeps finished units across comparisons (default: inside --out until it is "
                    "published)."),
    "overwrite": Option(OVERWRITE_HELP + " Also discards finished units.")})
def compare_moe_command(job: CompareMoEJob) -> None:
    """Train a LoRA-MoE with each expert allocation over training seeds, and say which is better."""
    from layerif.compare.moe import points_text

    result = job.run()
    if not job.quiet:
        typer.echo(result.table().to_string(index=False))
    if result.curve:
        screen = result.curve["screen"]
        typer.echo(f"screen: best validation point vs always {screen['label']!r}: {points_text(screen)} -> "
                   f"{'kept' if screen['kept'] else 'left out'}; suggested --steps {result.curve['steps']}")
    first = result.arms[0]["allocation"]
    for verdict in (v for v in result.verdicts if v["allocation"] == first):
        typer.echo(f"{first} vs {verdict['baseline']}: {verdict['reading']} ({points_text(verdict)})")
    typer.echo(f"wrote compare.json, compare.md, runs.csv and row_correct.csv to {job.out}")


@app.command("evaluate")
@job_options(EvalJob, own={
    "model": Option("Model folder (e.g. a pruned --out), hub id, .gguf or built-in name."),
    "ppl": Option("Text file for perplexity (e.g. WikiText-2 test.txt)."),
    "ppl_length": Option("Window length (default min(2048, context))."),
    "ppl_windows": Option("Score only the first N windows."),
    "tasks": comma_list("Comma list of task names or JSONL files, e.g. boolq,arc_easy,rte."),
    "data_dir": Option("Folder holding zeroshot/<task>/test.jsonl and moe/<task>/."),
    "limit": Option("First N rows of each task."),
    "batch_size": Option("Requests per forward."),
    "out": Option("Folder for eval.json (default: --model when it is a folder)."),
    "quiet": Option("No progress bars.")})
def evaluate_command(job: EvalJob) -> None:
    """Perplexity and zero-shot accuracy (lm-evaluation-harness, local task files); writes eval.json."""
    from rich.console import Console
    from rich.table import Table

    result, path = job.run()
    table = Table(title=f"evaluation of {job.model}")
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


# ---- LoRA-MoE commands (layerif allocate experts, layerif moe train, layerif moe evaluate) ----
@allocate_app.command("experts")
@job_options(ExpertsJob, own={
    "allocation": Option(EXPERT_ALLOCATIONS),
    "layers": Option("Number of layers (for uniform/MoLA without --scores)."),
    "model": Option("Model for alphalora (its PL_Alpha_Hill per block)."),
    "out": Option("Folder for experts.json (default: print the counts)."),
    "seed": Option("Seed of the random allocation's placement.")})
def allocate_experts_command(job: ExpertsJob) -> None:
    """Turn layer scores into LoRA experts per layer (exactly --budget in total, >= 1 per layer)."""
    result, path = job.run()
    if path is None:
        typer.echo(f"counts: {','.join(map(str, result.counts))}")
        typer.echo(f"top_k:  {','.join(map(str, result.top_k))}")
        typer.echo(f"total:  {result.budget} experts over {result.n_layers} layers")
    else:
        typer.echo(f"wrote {path}")


@moe_app.command("train")
@job_options(MoETrainJob, own={
    "train": Option("Training rows: JSONL/JSON/CSV file or dataset name."),
    "out": Option("Folder for the adapter, experts.json and train.json."),
    "split": Option("Split of a datasets dataset for --train."),
    "allocation": Option(EXPERT_ALLOCATIONS),
    "scores": Option("Run folder of `layerif score` (layerif/reversed)."),
    "budget": Option("Total experts T (not needed for a comma list)."),
    "beta": Option("Exponent beta > 0 of the allocation."),
    "rank": Option("Rank of every LoRA expert."),
    "alpha": Option("LoRA alpha (scale alpha / rank)."),
    "dropout": Option("Dropout on the expert input."),
    "modules": Option("Projections that get experts: attn, mlp or all."),
    "load_balancing": Option("Switch balance-loss coefficient (0 = off; 0.01 typical)."),
    "epochs": Option("Passes over the training rows."),
    "lr": Option("AdamW learning rate."),
    "batch_size": Option("Effective batch size."),
    "micro_batch_size": Option("Rows per forward (gradient accumulation); default: the largest that fits "
                               "--max-memory."),
    "max_memory": Option("Activation memory budget of one micro-batch, e.g. 4GiB (default: half the free memory)."),
    "warmup": Option("Warm-up steps (>= 1) or fraction (< 1); default min(100, 10 %)."),
    "cutoff": Option("Maximum tokens per training text."),
    "train_on_inputs": Option("Loss on the whole text or only the output.", ("--train-on-inputs/--output-only",)),
    "n_train": Option("Use only the first n training rows."),
    "seed": Option("Seed for initialisation, shuffling, dropout and the random allocation."),
    "quiet": Option("No progress bars.")})
def moe_train_command(job: MoETrainJob) -> None:
    """Train a LoRA-MoE with per-layer expert counts on MODEL and save it to --out."""
    log, result, n_layers = job.run()
    typer.echo(f"trained {log['trainable_parameters']:,} parameters ({result.budget} experts over {n_layers} "
               f"layers) for {log['steps']} steps, final loss {log['final_loss']:.4f}; wrote {job.out}")


@moe_app.command("evaluate")
@job_options(MoEEvalJob, own={
    "test": Option("Test rows with an `answer` field: JSONL/JSON/CSV file or dataset."),
    "adapter": Option("Adapter folder of `layerif moe train` (none: the base model)."),
    "model": Option("Base model (default: the one the adapter records)."),
    "split": Option("Split of a datasets dataset for --test."),
    "methods": comma_list("loglik and/or generate, comma separated.", "loglik,generate", ("--method",), as_tuple=True),
    "labels": comma_list("Label set, comma separated (default: the distinct answers)."),
    "n_test": Option("Use only the first n test rows."),
    "batch_size": Option("Rows per forward pass."),
    "max_new_tokens": Option("Generation length for --method generate."),
    "out": Option("eval.json path (default: ADAPTER/eval.json)."),
    "quiet": Option("No progress bars.")})
def moe_evaluate_command(job: MoEEvalJob) -> None:
    """Accuracy (± standard error) of an adapted model on test rows, by label log-likelihood and/or generation."""
    summary, path = job.run()
    for name, result in summary.items():
        typer.echo(f"{name}: accuracy {result['accuracy']:.4f} ± {result['stderr']:.4f} (n={result['n']})")
    if path is not None:
        typer.echo(f"wrote {path}")


# ---- report and export commands (layerif report, layerif export peft, layerif export sparsity) ----
@app.command("report")
@job_options(ReportJob, exclude=("runs",), defaults={"out": ...}, own={
    "out": Option("HTML file to write, e.g. report.html (self-contained, opens offline)."),
    "budget": Option("Total experts for the expert allocations (default 5 x blocks)."),
    "beta": Option("Exponent beta of the expert allocations."),
    "sparsity": Option("Target mean sparsity of the pruning allocations."),
    "epsilon": Option("Spread of the pruning ratio map."),
    "score": Option("Layer score the allocations and comparisons use.", ("--score",)),
    "model": Option("The scored model: adds AlphaLoRA, AlphaPruning (and OWL with --calib)."),
    "calib": Option("Calibration text for OWL (needs --model)."),
    "calib_sequences": Option("Calibration sequences (OWL).")})
def report_command(job: ReportJob, runs: list[str] = typer.Argument(
        ..., help="Run folders written by `layerif score` (one per task or setting).")) -> None:
    """One HTML page per study: profiles, intervals, module shares, allocations, and cross-task similarity."""
    typer.echo(f"wrote {job.run()}")


@export_app.command("peft")
@job_options(PeftExportJob, own={
    "scores": Option("Run folder of `layerif score`."),
    "total_rank": Option("Sum of the per-block LoRA ranks (>= number of blocks)."),
    "out": Option("JSON file of LoraConfig keyword arguments."),
    "beta": Option("Exponent beta > 0 applied to the scores."),
    "score": Option("Layer score: S_pos, S_top25 or S_all.", ("--score",)),
    "alpha_ratio": Option("lora_alpha = ratio x rank for every module."),
    "dropout": Option("lora_dropout."),
    "blocks_path": Option("Prefix of the block list, e.g. model.layers (default: the run's record, else keys like "
                          "3.self_attn.q_proj)."),
    "overwrite": Option("Replace an existing --out file.")})
def export_peft_command(job: PeftExportJob) -> None:
    """A PEFT LoraConfig whose rank_pattern gives each block's matrices a LayerIF-allocated rank."""
    ranks, path = job.run()
    typer.echo(f"ranks per block: {','.join(map(str, ranks))}")
    typer.echo(f"wrote {path} (LoraConfig(**json.load(open({str(path)!r}))))")


@export_app.command("sparsity")
@job_options(SparsityExportJob, own={
    "ratios": Option("ratios.json written by `layerif allocate sparsity` or `layerif prune`."),
    "out": Option("File to write."),
    "fmt": Option("yaml, json or csv.", ("--format",)),
    "blocks_path": Option("Rename the blocks.<l> prefix of ratios made without --model, e.g. model.layers."),
    "overwrite": Option("Replace an existing --out file.")})
def export_sparsity_command(job: SparsityExportJob) -> None:
    """Per-module sparsity map (module name -> ratio) and the per-block list, for pruning toolkits."""
    typer.echo(f"wrote {job.run()}")


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

    from layerif.errors import DiskError, LayerIFError
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
    except DiskError as exc:  # the machine's fault, not the input's: exit 1, still one line
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
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
