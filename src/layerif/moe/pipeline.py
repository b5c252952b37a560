"""End-to-end LoRA-MoE steps used by the CLI and the benchmark: allocate, train + save, load + evaluate."""

from __future__ import annotations

import time
from pathlib import Path

from layerif.allocate.experts import METHODS, ExpertAllocation, allocate_experts, model_alphas
from layerif.errors import LayerIFError
from layerif.io import atomic_write_json
from layerif.moe.config import MoEConfig
from layerif.moe.inject import (
    expected_parameters,
    inject_moe,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from layerif.moe.train import TrainConfig, train_moe


def allocation_from_scores(
    method: str,
    budget: int | None,
    beta: float = 2.5,
    top_k: int | None = None,
    scores_dir: str | Path | None = None,
    score: str = "S_pos",
    n_layers: int | None = None,
    model=None,
    alpha_modules: str = "all",
    seed: int = 0,
) -> ExpertAllocation:
    """Expert counts for `method`, reading layer scores from a `layerif score` run folder when needed."""
    scores = None
    arguments: dict = {"allocation": method, "score": score}
    if method in ("layerif", "reversed", "random"):
        if scores_dir is None:
            raise LayerIFError(f"--allocation {method} needs --scores (a folder written by `layerif score`)")
        from layerif.scores import LayerScores

        scores = LayerScores.load(scores_dir).scores(score)
        arguments["scores_dir"] = str(scores_dir)
    alphas = None
    if method == "alphalora":
        if model is None:
            raise LayerIFError("--allocation alphalora needs the model to compute PL_Alpha_Hill")
        alphas = model_alphas(model, modules=alpha_modules)
    if n_layers is None and scores is None and alphas is None and method in METHODS:
        raise LayerIFError(f"--allocation {method} needs the number of layers (give --scores or the model)")
    return allocate_experts(method, n_layers=n_layers, budget=budget, scores=scores, beta=beta, top_k=top_k,
                            alphas=alphas, arguments=arguments, seed=seed)


def train_adapter(
    loaded,
    rows: list[dict],
    allocation: ExpertAllocation,
    out: str | Path,
    moe_options: dict | None = None,
    train_config: TrainConfig | None = None,
    model_name: str | None = None,
    quiet: bool = False,
    extra: dict | None = None,
) -> dict:
    """Inject a LoRA-MoE with `allocation` into a LoadedModel, train it on rows, save adapter + logs to `out`."""
    train_config = train_config or TrainConfig()
    moe_options = dict(moe_options or {})
    if "load_balancing" not in moe_options and train_config.load_balancing is not None:
        moe_options["load_balancing"] = train_config.load_balancing
    config = MoEConfig(counts=allocation.counts, top_k=allocation.top_k, **moe_options)
    inject_moe(loaded.model, config, seed=train_config.seed)
    n_trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    if n_trainable != expected_parameters(loaded.model, config):  # a seam check, cheap
        raise RuntimeError("trainable parameters do not match the allocation")
    log = train_moe(loaded.model, loaded.tokenizer, rows, train_config, quiet=quiet)
    out = Path(out)
    info = {"model": model_name or loaded.source, "allocation": allocation.to_dict(), **(extra or {})}
    save_adapter(loaded.model, out, base_model=loaded.source, extra=info)
    allocation.save(out)
    log["trainable_parameters"] = n_trainable
    atomic_write_json(out / "train.json", log)
    return log


def load_for_eval(adapter: str | Path | None, model_name: str | None = None, dtype=None, device=None,
                  quiet: bool = False):
    """Load the base model an adapter was trained on (or `model_name`) and put the adapter in."""
    from layerif.models import load_model

    info = read_adapter_config(adapter) if adapter is not None else {}
    name = model_name or info.get("model")
    if name is None:
        raise LayerIFError("give --model (the adapter does not record its base model)")
    loaded = load_model(name, dtype=dtype, device=device, quiet=quiet)
    if adapter is not None:
        load_adapter(loaded.model, adapter, base_model=loaded.source)
    loaded.model.eval()
    return loaded


def evaluate_adapter(loaded, rows: list[dict], out: str | Path | None, methods=("loglik", "generate"),
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
