"""Python entry point: `score_layers(model, tokenizer, train, val, config) -> LayerScores`.

With several estimators (`ScoreConfig(estimator="datainf,identity,exact")`) the gradients are captured once and
`score_layers` returns a dict of LayerScores by estimator, in the order given; `scores.estimator_agreement`
compares their profiles.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from layerif.args import ScoreConfig
from layerif.data.loading import row_text
from layerif.data.tokens import EncodedSet, encode_answers, encode_texts, make_batches, resolve_loss
from layerif.errors import LayerIFError
from layerif.gradients.context import RunContext
from layerif.gradients.plan import PlanInputs, make_plan
from layerif.influence.engine import InfluenceResult, ScoringJob, compute_influences, layer_unit
from layerif.influence.lissa import convergence_summary
from layerif.models.blocks import select_matrices
from layerif.scores import LayerScores
from layerif.sizes import parse_bytes


def _texts(rows, what: str) -> list[str]:
    texts = [row if isinstance(row, str) else row_text(row) for row in rows]
    if not texts:
        raise LayerIFError(f"the {what} set is empty")
    return texts


def _answer_split(rows, what: str) -> tuple[list[str], list[str]]:
    """(prompt, full text) of instruction rows; the answer is the row's `output`, the last part of its text."""
    prompts, texts = [], []
    for position, row in enumerate(rows):
        output = str(row.get("output") or "") if isinstance(row, dict) else ""
        plain_text = isinstance(row, dict) and row.get("text") is not None and not {"instruction", "output"} <= set(row)
        if not output or plain_text:
            raise LayerIFError(f"--loss answer needs instruction rows with a non-empty output; {what} row {position} "
                               "is plain text or has no output (use --loss tokens for plain text)")
        text = row_text(row)
        prompts.append(text[: len(text) - len(output)])
        texts.append(text)
    if not texts:
        raise LayerIFError(f"the {what} set is empty")
    return prompts, texts


def _encode(rows, tokenizer, max_length: int, what: str, loss="tokens") -> EncodedSet:
    """Token ids of rows: dicts or strings are tokenised; tensors / int lists are taken as token ids.

    With loss="answer" every row must be an instruction row; its answer span is recorded.
    """
    if rows and isinstance(rows[0], (torch.Tensor, list, tuple)):
        if loss == "answer":
            raise LayerIFError(f"--loss answer needs instruction rows; the {what} rows are token ids")
        ids = [torch.as_tensor(row, dtype=torch.long)[:max_length] for row in rows]
        if any(len(row) < 2 for row in ids):
            raise LayerIFError(f"every {what} sample needs at least 2 tokens")
        return EncodedSet(ids)
    if tokenizer is None:
        raise LayerIFError("a tokenizer is needed for text rows")
    if loss == "answer":
        prompts, texts = _answer_split(rows, what)
        return encode_answers(prompts, texts, tokenizer, max_length, f"{what} sample")
    return encode_texts(_texts(rows, what), tokenizer, max_length, f"{what} sample")


def _length_sorted_batches(encoded: EncodedSet, batch_size: int, pad_id: int, subset: list[int] | None = None):
    """Batches of similar length (less padding); each batch keeps its samples' original numbers."""
    order = torch.argsort(encoded.lengths, descending=True, stable=True)
    if subset is not None:
        keep = torch.zeros(len(encoded), dtype=torch.bool)
        keep[subset] = True
        order = order[keep[order]]
    starts = None if encoded.answer_starts is None else [encoded.answer_starts[i] for i in order.tolist()]
    reordered = EncodedSet([encoded.input_ids[i] for i in order.tolist()], starts)
    batches = make_batches(reordered, batch_size, pad_id)
    for batch in batches:
        batch.index = order[batch.index]
    return batches


@dataclass
class _Prepared:
    """The rows of a run, tokenised, and how to cut them into batches."""

    train_rows: list
    val_rows: list
    train_encoded: EncodedSet
    val_encoded: EncodedSet
    pad_id: int

    def batches_of(self, dist) -> Callable[[int], tuple[list, list, list]]:
        """batch size -> (all training, this rank's training, this rank's validation) batches."""
        def make(size: int):
            return (_length_sorted_batches(self.train_encoded, size, self.pad_id),
                    _length_sorted_batches(self.train_encoded, size, self.pad_id,
                                           dist.shard(len(self.train_encoded)) if dist.enabled else None),
                    _length_sorted_batches(self.val_encoded, size, self.pad_id,
                                           dist.shard(len(self.val_encoded)) if dist.enabled else None))

        return make


def _prepare(tokenizer, train, val, config: ScoreConfig) -> _Prepared:
    """Select and tokenise the rows."""
    from layerif.data.loading import select_rows

    train_rows = select_rows(list(train), config.n_train, config.sample_seed, "training rows")
    val_rows = select_rows(list(val), config.n_val, config.sample_seed, "validation rows")
    loss = config.loss if isinstance(config.loss, str) else "tokens"
    pad_id = 0 if tokenizer is None else (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return _Prepared(train_rows, val_rows, _encode(train_rows, tokenizer, config.max_length, "training", loss),
                     _encode(val_rows, tokenizer, config.max_length, "validation", loss), pad_id)


@contextmanager
def _scoring_model(model: nn.Module, config: ScoreConfig, all_train_batches, timings: dict) -> Iterator[nn.Module]:
    """The model as scored (LoRA-wrapped and fine-tuned in lora space), in eval mode; restored afterwards."""
    wrapped = None
    if config.params == "lora":
        from layerif.gradients.lora import Finetuning, attach_lora, finetune_lora

        started = time.perf_counter()
        wrapped = attach_lora(model, config.modules, config.lora_rank, config.lora_alpha, config.seed)
        if config.finetune_epochs > 0:
            # every rank fine-tunes on all samples with the same seed, so the adapters stay identical
            settings = Finetuning(config.finetune_epochs, config.finetune_lr, config.seed, config.quiet)
            finetune_lora(wrapped, all_train_batches, settings, resolve_loss(config.loss))
        timings["finetune_s"] = time.perf_counter() - started
    scored = wrapped if wrapped is not None else model
    was_training = scored.training
    scored.eval()
    try:
        yield scored
    finally:
        scored.train(was_training)
        if wrapped is not None:
            from layerif.gradients.lora import detach_lora

            detach_lora(wrapped)


_PEAK_BEFORE_RESET = 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (across any `restart_peak_rss`)."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _PEAK_BEFORE_RESET)


def restart_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter so a phase can be measured alone (Linux); False if unsupported."""
    global _PEAK_BEFORE_RESET
    _PEAK_BEFORE_RESET = peak_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _config_record(config: ScoreConfig) -> dict:
    """The config as plain values (a callable loss is recorded by its name)."""
    record = asdict(config)
    if callable(config.loss):
        record["loss"] = getattr(config.loss, "__qualname__", repr(config.loss))
    return record


def run_fingerprint(model: nn.Module, config: ScoreConfig, train_encoded, val_encoded) -> dict:
    """What decides a run's numbers: config, model identity and the exact token ids scored."""
    import hashlib

    digest = hashlib.sha256()
    for encoded in (train_encoded, val_encoded):
        for ids in encoded.input_ids:
            digest.update(ids.numpy().tobytes())
            digest.update(b"|")
        if encoded.answer_starts is not None:
            digest.update(torch.tensor(encoded.answer_starts).numpy().tobytes())
    first = next(model.parameters())
    settings = {k: v for k, v in _config_record(config).items() if k not in ("quiet", "max_memory", "strategy", "bootstrap",
                                                                       "bootstrap_seed")}
    return {
        "config": settings,
        "model": {"class": type(model).__name__, "name": getattr(getattr(model, "config", None), "_name_or_path", ""),
                  "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(first.dtype),
                  "probe": float(first.detach().double().sum())},
        "data": digest.hexdigest(),
    }


def _open_checkpoint(model: nn.Module, config: ScoreConfig, data: _Prepared, directory: str | None, restart: bool,
                     dist):
    """The run's checkpoint (None without a directory, or when data-parallel)."""
    if directory is None or dist.enabled:
        return None
    from layerif.checkpoint import Checkpoint

    fingerprint = run_fingerprint(model, config, data.train_encoded, data.val_encoded)
    return Checkpoint(directory, fingerprint).open(overwrite=restart)


def _estimator_options(config: ScoreConfig) -> dict:
    """Estimator settings of a run (LiSSA's depth, tolerance, scale, mini-batch, repeats, plan and seed)."""
    names = ("lissa_depth", "lissa_tol", "lissa_scale", "lissa_batch", "lissa_repeats", "lissa_plan")
    return {**{name: getattr(config, name, None) for name in names}, "seed": config.seed}


def _check_estimators(config: ScoreConfig, dist) -> None:
    """Estimator choices data-parallel scoring cannot serve."""
    if dist.enabled and (set(config.estimators) - {"datainf", "identity"} or config.pairwise):
        raise LayerIFError("data-parallel scoring supports datainf and identity without --pairwise; "
                           f"run {config.estimator}{' with --pairwise' if config.pairwise else ''} in one process")


def _done_layers(checkpoint, n_layers: int, names: list[str]) -> frozenset[int]:
    """Layers every estimator has in the checkpoint (units are per estimator when there are several)."""
    suffixes = [None] if len(names) == 1 else names
    return frozenset(layer for layer in range(n_layers) if checkpoint is not None
                     and all(checkpoint.has(layer_unit(layer, suffix)) for suffix in suffixes))


def score_layers(
    model: nn.Module, tokenizer, train, val, config: ScoreConfig | None = None,
    checkpoint_dir: str | None = None, restart: bool = False, spill_dir: str | None = None,
) -> LayerScores | dict[str, LayerScores]:
    """Per-layer LayerIF influence of `train` rows (dicts or strings) on the loss of `val` rows.

    With `checkpoint_dir`, finished layers / passes are saved there and a later call with the same
    model, data and config continues from them (`restart=True` discards them). Gradient factors that
    do not fit the memory budget may be spilled under `spill_dir` (default: the temporary directory).
    One estimator gives one LayerScores; several (a comma list) give a dict by estimator from one capture.
    """
    from layerif import distributed

    config = config or ScoreConfig()
    config.validate()
    dist = distributed.current()
    _check_estimators(config, dist)
    started = time.perf_counter()
    data = _prepare(tokenizer, train, val, config)
    batches_of = data.batches_of(dist)
    timings: dict[str, float] = {"tokenize_s": time.perf_counter() - started}
    with _scoring_model(model, config, batches_of(config.batch_size)[0], timings) as scored:
        per_layer = select_matrices(scored, config.modules, config.params)
        checkpoint = _open_checkpoint(scored, config, data, checkpoint_dir, restart, dist)
        done = _done_layers(checkpoint, len(per_layer), config.estimators)
        plan = make_plan(PlanInputs(scored, per_layer, batches_of, config.estimator, config.pairwise,
                                    config.batch_size, parse_bytes(config.max_memory), config.strategy, done,
                                    spill_dir, dist))
        _, train_batches, val_batches = batches_of(plan.batch_size)
        ctx = RunContext(next(scored.parameters()).device,
                         torch.float64 if config.compute_dtype == "float64" else torch.float32, dist, config.quiet,
                         config.on_nonfinite == "skip", resolve_loss(config.loss), plan.kernel_bytes, spill_dir)
        job = ScoringJob(scored, per_layer, train_batches, val_batches, len(data.train_rows), len(data.val_rows),
                         config.estimator, config.pairwise, _estimator_options(config))
        started = time.perf_counter()
        results = compute_influences(job, plan, ctx, checkpoint)
        timings["influence_s"] = time.perf_counter() - started
    metadata = {
        "config": _config_record(config), "plan": plan.to_dict(),
        "train_passes": next(iter(results.values())).train_passes,
        "resumed": None if checkpoint is None or not checkpoint.loaded else {
            "units_loaded": checkpoint.loaded, "units_recomputed": checkpoint.recomputed},
        "timings": timings, "world_size": dist.world_size,
    }
    if ctx.device.type == "cuda":
        metadata["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(ctx.device))
    by_estimator = {name: _assemble(result, per_layer, data, {**metadata, "estimator": name})
                    for name, result in results.items()}
    if config.bootstrap:
        started = time.perf_counter()
        for scores in by_estimator.values():
            scores.bootstrap(config.bootstrap, config.bootstrap_seed)
        timings["bootstrap_s"] = time.perf_counter() - started
    return by_estimator if len(by_estimator) > 1 else by_estimator[config.estimator]


def _assemble(result: InfluenceResult, per_layer, data: _Prepared, metadata: dict) -> LayerScores:
    """LayerScores (q = -I, summed over each layer's matrices) with the run's metadata."""
    module_names = sorted({ref.name for refs in per_layer for ref in refs}, key=_module_order(per_layer))
    n_train = len(data.train_rows)
    q_modules = torch.full((len(per_layer), len(module_names), n_train), float("nan"), dtype=torch.float64)
    for layer, refs in enumerate(per_layer):
        for slot, ref in enumerate(refs):
            q_modules[layer, module_names.index(ref.name)] = -result.influence[layer][slot]
    q = torch.nan_to_num(q_modules, nan=0.0).sum(dim=1)
    q_pairwise = None if result.pairwise is None else -torch.stack(result.pairwise).float()
    metadata = {
        **metadata,
        "damping": result.damping,
        "estimator_info": result.estimator_info,
        "estimator_s": result.estimator_s,
        "convergence": convergence_summary(result.estimator_info),
        "left_out": {"training": {str(k): v for k, v in result.left_out_train.items()},
                     "validation": {str(k): v for k, v in result.left_out_val.items()}},
        "peak_rss_bytes": peak_rss_bytes(),
        "n_train": n_train,
        "n_val": len(data.val_rows),
        "train_tokens": int(data.train_encoded.lengths.sum()),
        "val_tokens": int(data.val_encoded.lengths.sum()),
    }
    return LayerScores(q=q.float(), module_names=module_names, q_modules=q_modules.float(),
                       n_params=[sum(ref.n_params for ref in refs) for refs in per_layer], n_val=len(data.val_rows),
                       q_pairwise=q_pairwise, metadata=metadata)


def _module_order(per_layer):
    first_seen: dict[str, int] = {}
    for refs in per_layer:
        for ref in refs:
            first_seen.setdefault(ref.name, len(first_seen))
    return lambda name: first_seen[name]
