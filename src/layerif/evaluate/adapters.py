"""`layerif moe evaluate` as a job object: label accuracy of a base model with (or without) a LoRA-MoE adapter."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from layerif.errors import LayerIFError
from layerif.outdir import OutputFolder

METHODS = ("loglik", "generate")


def load_for_eval(adapter: str | Path | None, model_name: str | None = None, dtype=None, device=None,
                  quiet: bool = False):
    """Load the base model an adapter was trained on (or `model_name`) and put the adapter in.

    The base is accepted by content (architecture, sizes and a weight fingerprint), not by how it is named.
    """
    from layerif.models import load_model
    from layerif.moe.inject import load_adapter, read_adapter_config

    info = read_adapter_config(adapter) if adapter is not None else {}
    name = model_name or info.get("model")
    if name is None:
        raise LayerIFError("give --model (the adapter does not record its base model)")
    loaded = load_model(name, dtype=dtype, device=device, quiet=quiet)
    if adapter is not None:
        load_adapter(loaded.model, adapter, base_model=loaded.source)
    loaded.model.eval()
    return loaded


def evaluate_adapter(loaded, rows: list[dict], out: str | Path | None, methods=METHODS,
                     labels: list[str] | None = None, batch_size: int = 16, max_length: int = 256,
                     max_new_tokens: int = 16, quiet: bool = False, extra: dict | None = None) -> dict:
    """Label accuracy of a loaded (adapted) model on rows; writes eval.json when `out` is given."""
    from layerif.evaluate.labels import evaluate_labels, write_eval_json

    started = time.perf_counter()
    results = evaluate_labels(loaded.model, loaded.tokenizer, rows, tuple(methods), labels, batch_size,
                              max_length, max_new_tokens, quiet)
    summary = {name: result.summary() for name, result in results.items()}
    if out is not None:
        write_eval_json(out, results, rows, {"seconds": time.perf_counter() - started, **(extra or {})})
    return summary


@dataclass
class MoEEvalJob:
    """Everything `layerif moe evaluate` needs."""

    test: str
    adapter: str | None = None
    model: str | None = None
    split: str | None = None
    methods: tuple[str, ...] = METHODS
    labels: list[str] | None = None
    n_test: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 16
    out: str | None = None
    dtype: str | None = None
    device: str | None = None
    quiet: bool = False
    overwrite: bool = False

    def output_path(self) -> Path | None:
        """The eval.json path: --out, else ADAPTER/eval.json, else none."""
        if self.out is not None:
            return Path(self.out)
        return Path(self.adapter) / "eval.json" if self.adapter is not None else None

    def validate(self) -> OutputFolder | None:
        """Check every argument that can be checked before loading the model; the checked output folder."""
        from layerif.allocate.jobs import check_model_argument
        from layerif.data.loading import check_source
        from layerif.models.load import check_device, resolve_dtype
        from layerif.moe.inject import read_adapter_config

        if self.adapter is None and self.model is None:
            raise LayerIFError("give --adapter or --model")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise LayerIFError(f"--method takes {' and/or '.join(METHODS)}, got {','.join(self.methods) or 'nothing'}")
        for flag, value in (("--n-test", self.n_test), ("--batch-size", self.batch_size),
                            ("--max-new-tokens", self.max_new_tokens)):
            if value is not None and value < 1:
                raise LayerIFError(f"{flag} must be >= 1, got {value}")
        check_source(self.test, self.split)
        if self.adapter is not None:
            read_adapter_config(self.adapter)
        resolve_dtype(self.dtype)
        check_device(self.device)
        check_model_argument(self.model)
        path = self.output_path()
        if path is None:
            return None
        if path.is_dir() and not path.is_symlink():
            raise LayerIFError(f"--out {path} is a folder; give the path of the eval.json to write, e.g. {path}/eval.json")
        folder = OutputFolder(path.parent, "moe evaluate", overwrite=self.overwrite,
                              inputs=[] if self.out is None else [self.model], names=[path.name], shared=True,
                              flag="--out folder")
        folder.check()
        return folder

    def run(self) -> tuple[dict, Path | None]:
        """Evaluate and publish eval.json -> (accuracy per method, its path or None)."""
        from layerif.data import load_rows, select_rows

        folder = self.validate()
        rows = select_rows(load_rows(self.test, self.split, self.quiet), self.n_test, what="test rows")
        extra = {"adapter": self.adapter, "test": self.test, "n_test": len(rows)}
        if folder is None:
            loaded = load_for_eval(self.adapter, self.model, self.dtype, self.device, self.quiet)
            return evaluate_adapter(loaded, rows, None, self.methods, self.labels, self.batch_size,
                                    max_new_tokens=self.max_new_tokens, quiet=self.quiet, extra=extra), None
        name = self.output_path().name
        with folder:
            loaded = load_for_eval(self.adapter, self.model, self.dtype, self.device, self.quiet)
            summary = evaluate_adapter(loaded, rows, folder.staging / name, self.methods, self.labels,
                                       self.batch_size, max_new_tokens=self.max_new_tokens, quiet=self.quiet,
                                       extra=extra)
            folder.publish()
        return summary, folder.out / name
