"""Python entry point: `score_layers(model, tokenizer, train, val, config) -> LayerScores`."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict

import torch
from torch import nn

from layerif.args import ScoreConfig
from layerif.data.loading import row_text
from layerif.data.tokens import Batch, encode_texts, make_batches
from layerif.errors import LayerIFError
from layerif.gradients.passes import measure_pass
from layerif.gradients.plan import (
    estimate_factor_bytes,
    plan_passes,
    shared_inputs,
    working_bytes,
)
from layerif.influence.engine import compute_influence
from layerif.models.blocks import select_matrices
from layerif.scores import LayerScores

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str | int | float | None) -> int | None:
    """'4GiB', '512MB', '2g' or a number of bytes -> bytes (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise LayerIFError(f"cannot read memory size {text!r}; write e.g. 4GiB, 512MB or a number of bytes")
    return int(value * _UNITS[unit])


def _texts(rows, what: str) -> list[str]:
    texts = [row if isinstance(row, str) else row_text(row) for row in rows]
    if not texts:
        raise LayerIFError(f"the {what} set is empty")
    return texts


def _encode(rows, tokenizer, max_length: int, what: str):
    """Token ids of rows: dicts or strings are tokenised; tensors / int lists are taken as token ids."""
    from layerif.data.tokens import EncodedSet

    if rows and isinstance(rows[0], (torch.Tensor, list, tuple)):
        ids = [torch.as_tensor(row, dtype=torch.long)[:max_length] for row in rows]
        if any(len(row) < 2 for row in ids):
            raise LayerIFError(f"every {what} sample needs at least 2 tokens")
        return EncodedSet(ids)
    if tokenizer is None:
        raise LayerIFError("a tokenizer is needed for text rows")
    return encode_texts(_texts(rows, what), tokenizer, max_length, f"{what} sample")


def _length_sorted_batches(encoded, batch_size: int, pad_id: int, subset: list[int] | None = None):
    """Batches of similar length (less padding); each batch keeps its samples' original numbers."""
    from layerif.data.tokens import EncodedSet

    order = torch.argsort(encoded.lengths, descending=True, stable=True)
    if subset is not None:
        keep = torch.zeros(len(encoded), dtype=torch.bool)
        keep[subset] = True
        order = order[keep[order]]
    reordered = EncodedSet([encoded.input_ids[i] for i in order.tolist()])
    batches = make_batches(reordered, batch_size, pad_id)
    for batch in batches:
        batch.index = order[batch.index]
    return batches


def default_budget(device: torch.device) -> int:
    """Half of the memory free right now on the device that will hold the stored gradients."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    import psutil

    return int(psutil.virtual_memory().available * 0.5)


def _spill_io_cost(forward_s_per_token: float, batches, factor_bytes: int, spill_dir: str | None,
                   forced: bool) -> tuple[float | None, dict]:
    """Estimated cost of writing the factors to disk and reading them back, in forward passes over `batches`.

    Measured, not guessed: a synced 64 MiB write to the spill directory, against the forward time per
    token timed on the longest sample. None when the disk lacks room for the factors (plus 1 GiB) or
    cannot be written.
    """
    from layerif.gradients.spill import disk_write_bandwidth, free_disk_bytes

    free = free_disk_bytes(spill_dir)
    if free < factor_bytes + (1 << 30):
        if forced:
            raise LayerIFError(f"--strategy spill needs {(factor_bytes >> 20) + 1024} MiB of free disk under "
                               f"{spill_dir or 'the temporary directory'}; only {free >> 20} MiB are free")
        return None, {"spill_disk_free_bytes": free}
    if not batches:
        return 0.0, {}
    try:
        bandwidth = disk_write_bandwidth(spill_dir)
    except OSError as exc:
        if forced:
            raise LayerIFError(f"cannot write spilled gradients under {spill_dir or 'the temporary directory'}: "
                               f"{exc.strerror or exc}") from None
        return None, {"spill_disk_error": str(exc)}
    forward_s = forward_s_per_token * sum(int(batch.input_ids.numel()) for batch in batches)
    # written once, read back once from disk (a layer's repeated reads then come from the page cache)
    io_s = 2 * factor_bytes / bandwidth
    probe = {"spill_disk_write_bytes_per_s": round(bandwidth), "spill_forward_s": round(forward_s, 3),
             "spill_io_s": round(io_s, 3)}
    return io_s / max(forward_s, 1e-9), probe


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


def run_fingerprint(model: nn.Module, config: ScoreConfig, train_encoded, val_encoded) -> dict:
    """What decides a run's numbers: config, model identity and the exact token ids scored."""
    import hashlib

    digest = hashlib.sha256()
    for encoded in (train_encoded, val_encoded):
        for ids in encoded.input_ids:
            digest.update(ids.numpy().tobytes())
            digest.update(b"|")
    first = next(model.parameters())
    settings = {k: v for k, v in asdict(config).items() if k not in ("quiet", "max_memory", "strategy", "bootstrap", "bootstrap_seed")}
    return {
        "config": settings,
        "model": {"class": type(model).__name__, "name": getattr(getattr(model, "config", None), "_name_or_path", ""),
                  "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(first.dtype),
                  "probe": float(first.detach().double().sum())},
        "data": digest.hexdigest(),
    }


def score_layers(
    model: nn.Module, tokenizer, train, val, config: ScoreConfig | None = None,
    checkpoint_dir: str | None = None, restart: bool = False, spill_dir: str | None = None,
) -> LayerScores:
    """Per-layer LayerIF influence of `train` rows (dicts or strings) on the loss of `val` rows.

    With `checkpoint_dir`, finished layers / passes are saved there and a later call with the same
    model, data and config continues from them (`restart=True` discards them). Gradient factors that
    do not fit the memory budget may be spilled under `spill_dir` (default: the temporary directory).
    """
    from layerif import distributed
    from layerif.data.loading import select_rows

    config = config or ScoreConfig()
    config.validate()
    if config.loss != "tokens":  # the answer-only / custom loss is not wired into the passes in this version
        raise LayerIFError(f"--loss {config.loss!r} is not supported by this version; use --loss tokens")
    dist = distributed.current()
    if dist.enabled and (config.estimator == "exact" or config.pairwise):
        raise LayerIFError("data-parallel scoring supports datainf and identity without --pairwise; "
                           "run exact or pairwise in one process")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    train_rows = select_rows(list(train), config.n_train, config.sample_seed, "training rows")
    val_rows = select_rows(list(val), config.n_val, config.sample_seed, "validation rows")
    train_encoded = _encode(train_rows, tokenizer, config.max_length, "training")
    val_encoded = _encode(val_rows, tokenizer, config.max_length, "validation")
    pad_id = 0 if tokenizer is None else (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    def batches_of(size: int):
        """(all training, this rank's training, this rank's validation) batches of `size` samples."""
        return (_length_sorted_batches(train_encoded, size, pad_id),
                _length_sorted_batches(train_encoded, size, pad_id,
                                       dist.shard(len(train_encoded)) if dist.enabled else None),
                _length_sorted_batches(val_encoded, size, pad_id,
                                       dist.shard(len(val_encoded)) if dist.enabled else None))

    all_train_batches, train_batches, val_batches = batches_of(config.batch_size)
    timings["tokenize_s"] = time.perf_counter() - started

    wrapped = None
    if config.params == "lora":
        from layerif.gradients.lora import attach_lora, finetune_lora

        started = time.perf_counter()
        wrapped = attach_lora(model, config.modules, config.lora_rank, config.lora_alpha, config.seed)
        if config.finetune_epochs > 0:
            # every rank fine-tunes on all samples with the same seed, so the adapters stay identical
            finetune_lora(wrapped, all_train_batches, config.finetune_epochs, config.finetune_lr, config.seed, config.quiet)
        timings["finetune_s"] = time.perf_counter() - started
    scored_model = wrapped if wrapped is not None else model
    checkpoint = None
    if checkpoint_dir is not None and not dist.enabled:
        from layerif.checkpoint import Checkpoint

        fingerprint = run_fingerprint(scored_model, config, train_encoded, val_encoded)
        checkpoint = Checkpoint(checkpoint_dir, fingerprint).open(overwrite=restart)
    was_training = scored_model.training
    scored_model.eval()
    try:
        per_layer = select_matrices(scored_model, config.modules, config.params)
        device = next(scored_model.parameters()).device
        elem = next(scored_model.parameters()).element_size()
        budget = parse_bytes(config.max_memory) or default_budget(device)
        shared = shared_inputs(scored_model, per_layer, all_train_batches[0])
        # One forward measures a batch's working memory and the forward speed; the batch shrinks when its
        # activations would take more than half the budget (the results do not depend on the batch size).
        # Probed on the single longest sample, so the probe itself stays small.
        longest = all_train_batches[0]
        one = Batch(longest.input_ids[:1], longest.attention_mask[:1], longest.labels[:1], longest.index[:1])
        bytes_per_sample, probe_s = measure_pass(scored_model, one)
        forward_s_per_token = probe_s / max(int(one.input_ids.numel()), 1)
        batch_size = config.batch_size
        if bytes_per_sample * batch_size > budget // 2 and batch_size > 1:
            batch_size = max(1, min(batch_size, int(budget // 2 // max(bytes_per_sample, 1))))
        batch_size = dist.broadcast_object(batch_size)
        if batch_size != config.batch_size:
            all_train_batches, train_batches, val_batches = batches_of(batch_size)
        activation = int(bytes_per_sample * max(len(batch.index) for batch in all_train_batches))
        layer_bytes = estimate_factor_bytes(per_layer, train_batches, elem, shared)
        val_bytes = estimate_factor_bytes(per_layer, val_batches, elem, shared)
        if config.pairwise:
            layer_bytes = [a + b for a, b in zip(layer_bytes, val_bytes)]
        working = working_bytes(per_layer, activation)
        from layerif.influence.engine import layer_unit

        remaining = [layer for layer in range(len(per_layer))
                     if checkpoint is None or not checkpoint.has(layer_unit(layer))]
        remaining_bytes = [layer_bytes[layer] for layer in remaining] or [0]
        store_budget = max(budget - working, 1)
        spill_io_cost, spill_probe = None, {}
        if remaining and config.strategy in ("auto", "spill") and sum(remaining_bytes) > store_budget:
            # a spill writes the validation factors too (already in layer_bytes with --pairwise)
            disk_bytes = sum(remaining_bytes) + (0 if config.pairwise else sum(val_bytes[layer] for layer in remaining))
            spill_io_cost, spill_probe = _spill_io_cost(forward_s_per_token, train_batches, disk_bytes, spill_dir,
                                                        forced=config.strategy == "spill")
        plan = plan_passes(
            config.estimator, config.pairwise, remaining_bytes, store_budget,
            None if config.strategy == "auto" else config.strategy, spill_io_cost,
        )
        plan.estimated_cost.update(spill_probe)
        plan.groups = [[remaining[i] for i in group] for group in plan.groups] if remaining else []
        if not remaining:
            plan.mode, plan.reason = "store", "every layer was already in the checkpoint"
        plan.passes = len(plan.groups) if plan.mode == "store" else (plan.passes if remaining else 0)
        plan.budget_bytes = budget
        plan.batch_size, plan.activation_bytes = batch_size, activation
        if batch_size != config.batch_size:
            plan.reason += (f"; batches of {batch_size} instead of {config.batch_size} samples so that one batch's "
                            f"activations (~{activation / (1 << 30):.2f} GiB) stay within half the budget")
        if plan.mode != "store" or len(plan.groups) > 1:
            plan.reason += (f" (of the {budget / (1 << 30):.2f} GiB --max-memory, {min(working, budget) / (1 << 30):.2f} GiB"
                            " is set aside for activations and weight-sized sums)")
        plan = dist.broadcast_object(plan)  # every rank must run the same passes
        compute_dtype = torch.float64 if config.compute_dtype == "float64" else torch.float32
        started = time.perf_counter()
        result = compute_influence(
            scored_model, per_layer, train_batches, val_batches, len(train_rows), len(val_rows),
            config.estimator, config.pairwise, plan, compute_dtype, config.quiet,
            kernel_bytes=max(min(budget // 4, 4 << 30), 64 << 20), checkpoint=checkpoint, dist=dist,
            spill_dir=spill_dir, skip_nonfinite=config.on_nonfinite == "skip",
        )
        timings["influence_s"] = time.perf_counter() - started
    finally:
        scored_model.train(was_training)
        if wrapped is not None:
            from layerif.gradients.lora import detach_lora

            detach_lora(wrapped)

    module_names = sorted({ref.name for refs in per_layer for ref in refs}, key=_module_order(per_layer))
    n_train = len(train_rows)
    q_modules = torch.full((len(per_layer), len(module_names), n_train), float("nan"), dtype=torch.float64)
    for layer, refs in enumerate(per_layer):
        for slot, ref in enumerate(refs):
            q_modules[layer, module_names.index(ref.name)] = -result.influence[layer][slot]
    q = torch.nan_to_num(q_modules, nan=0.0).sum(dim=1)
    q_pairwise = None
    if result.pairwise is not None:
        q_pairwise = -torch.stack(result.pairwise).float()
    metadata = {
        "config": asdict(config),
        "plan": plan.to_dict(),
        "train_passes": result.train_passes,
        "resumed": None if checkpoint is None or not checkpoint.loaded else {
            "units_loaded": checkpoint.loaded, "units_recomputed": checkpoint.recomputed},
        "timings": timings,
        "damping": result.damping,
        "left_out": {"training": {str(k): v for k, v in result.left_out_train.items()},
                     "validation": {str(k): v for k, v in result.left_out_val.items()}},
        "peak_rss_bytes": peak_rss_bytes(),
        "world_size": dist.world_size,
        "n_train": n_train,
        "n_val": len(val_rows),
        "train_tokens": int(train_encoded.lengths.sum()),
        "val_tokens": int(val_encoded.lengths.sum()),
    }
    if device.type == "cuda":
        metadata["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    scores = LayerScores(
        q=q.float(),
        module_names=module_names,
        q_modules=q_modules.float(),
        n_params=[sum(ref.n_params for ref in refs) for refs in per_layer],
        n_val=len(val_rows),
        q_pairwise=q_pairwise,
        metadata=metadata,
    )
    if config.bootstrap:
        started = time.perf_counter()
        scores.bootstrap(config.bootstrap, config.bootstrap_seed)
        timings["bootstrap_s"] = time.perf_counter() - started
    return scores


def _module_order(per_layer):
    first_seen: dict[str, int] = {}
    for refs in per_layer:
        for ref in refs:
            first_seen.setdefault(ref.name, len(first_seen))
    return lambda name: first_seen[name]
