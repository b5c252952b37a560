"""`layerif evaluate`: perplexity and zero-shot accuracy of a (pruned) model, written to eval.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerif.errors import LayerIFError
from layerif.io import atomic_write_json


@dataclass
class EvalJob:
    """Everything `layerif evaluate` needs."""

    model: str
    ppl: str | None = None
    ppl_length: int | None = None
    ppl_windows: int | None = None
    tasks: list[str] | None = None
    data_dir: str | None = None
    limit: int | None = None
    batch_size: int = 16
    out: str | None = None
    dtype: str | None = None
    device: str | None = None
    quiet: bool = False


def validate(job: EvalJob) -> None:
    """Check the inputs (every task file parses) before spending time on the model."""
    from layerif.evaluate.zeroshot import load_task_docs, resolve_task

    if job.ppl is None and not job.tasks:
        raise LayerIFError("nothing to evaluate: pass --ppl and/or --tasks")
    if job.ppl is not None and not Path(job.ppl).is_file():
        raise LayerIFError(f"perplexity text not found: {job.ppl}")
    for task in job.tasks or []:
        name, path = resolve_task(task, job.data_dir)
        load_task_docs(path, name, job.limit)


def evaluate_loaded(model, tokenizer, job: EvalJob) -> dict:
    """Perplexity and/or zero-shot results of an already-loaded model."""
    from layerif.evaluate.perplexity import perplexity
    from layerif.evaluate.zeroshot import zeroshot_accuracy

    validate(job)
    result: dict = {"model": job.model}
    if job.ppl is not None:
        result["perplexity"] = perplexity(model, tokenizer, job.ppl, job.ppl_length, job.ppl_windows,
                                          batch_size=max(1, job.batch_size // 4), quiet=job.quiet)
    if job.tasks:
        result["zeroshot"] = zeroshot_accuracy(model, tokenizer, job.tasks, job.data_dir, job.limit,
                                               job.batch_size, job.quiet)
    return result


def run_evaluate(job: EvalJob) -> tuple[dict, Path | None]:
    """Load job.model, evaluate it, write eval.json (into --out, or the model folder when it is one)."""
    from layerif.models import load_model

    validate(job)
    loaded = load_model(job.model, dtype=job.dtype, device=job.device, quiet=job.quiet)
    result = evaluate_loaded(loaded.model, loaded.tokenizer, job)
    out = Path(job.out) if job.out is not None else (Path(job.model) if Path(job.model).is_dir() else None)
    path = atomic_write_json(out / "eval.json", result) if out is not None else None
    return result, path
