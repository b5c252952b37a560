"""`layerif evaluate`: perplexity and zero-shot accuracy of a (pruned) model, written to eval.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerif.errors import LayerIFError
from layerif.io import atomic_write_json
from layerif.outdir import OutputFolder

OUTPUT = "eval.json"


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
    overwrite: bool = False
    trust_remote_code: bool = False  # run code shipped in a model folder (--trust-remote-code)

    def output_folder(self) -> OutputFolder | None:
        """Where eval.json goes: --out, else the model folder itself (eval.json is added beside the model)."""
        model_dir = Path(self.model).expanduser()
        if self.out is None and not model_dir.is_dir():
            return None
        out = Path(self.out) if self.out is not None else model_dir
        beside_model = model_dir.is_dir() and out.resolve() == model_dir.resolve()
        return OutputFolder(out, "evaluate", overwrite=self.overwrite, inputs=[self.model], names=[OUTPUT],
                            shared=beside_model)

    def validate(self) -> OutputFolder | None:
        """Check the inputs (every task file parses, the output can be written) before loading the model."""
        from layerif.evaluate.zeroshot import load_task_docs, resolve_task
        from layerif.models.load import check_device, check_model_source, resolve_dtype

        if self.ppl is None and not self.tasks:
            raise LayerIFError("nothing to evaluate: pass --ppl and/or --tasks")
        if self.ppl is not None and not Path(self.ppl).is_file():
            raise LayerIFError(f"perplexity text not found: {self.ppl}")
        for flag, value, least in (("--ppl-length", self.ppl_length, 2), ("--ppl-windows", self.ppl_windows, 1),
                                   ("--limit", self.limit, 1), ("--batch-size", self.batch_size, 1)):
            if value is not None and value < least:
                raise LayerIFError(f"{flag} must be >= {least}, got {value}")
        for task in self.tasks or []:
            name, path = resolve_task(task, self.data_dir)
            load_task_docs(path, name, self.limit)
        resolve_dtype(self.dtype)
        check_device(self.device)
        check_model_source(self.model, trust_remote_code=self.trust_remote_code)
        folder = self.output_folder()
        if folder is not None:
            folder.check()
        return folder

    def check_model(self, model) -> None:
        """Checks that need the loaded model: the perplexity window must fit its context."""
        from layerif.calibration import model_context

        context = model_context(model)
        if self.ppl_length is not None and context is not None and self.ppl_length > context:
            raise LayerIFError(f"--ppl-length {self.ppl_length} is longer than the model's context ({context})")

    def evaluate(self, model, tokenizer) -> dict:
        """Perplexity and/or zero-shot results of an already-loaded model."""
        from layerif.evaluate.perplexity import perplexity
        from layerif.evaluate.zeroshot import zeroshot_accuracy

        self.check_model(model)
        result: dict = {"model": self.model}
        if self.ppl is not None:
            result["perplexity"] = perplexity(model, tokenizer, self.ppl, self.ppl_length, self.ppl_windows,
                                              batch_size=max(1, self.batch_size // 4), quiet=self.quiet)
        if self.tasks:
            result["zeroshot"] = zeroshot_accuracy(model, tokenizer, self.tasks, self.data_dir, self.limit,
                                                   self.batch_size, self.quiet)
        return result

    def run(self) -> tuple[dict, Path | None]:
        """Load the model, evaluate it, publish eval.json -> (result, its path or None)."""
        from layerif.models import load_model

        folder = self.validate()
        if folder is None:
            loaded = load_model(self.model, dtype=self.dtype, device=self.device, quiet=self.quiet,
                                trust_remote_code=self.trust_remote_code)
            return self.evaluate(loaded.model, loaded.tokenizer), None
        with folder:
            loaded = load_model(self.model, dtype=self.dtype, device=self.device, quiet=self.quiet,
                                trust_remote_code=self.trust_remote_code)
            result = self.evaluate(loaded.model, loaded.tokenizer)
            atomic_write_json(folder.staging / OUTPUT, result)
            folder.publish()
        return result, folder.out / OUTPUT
