"""Decide how gradients are kept: factors in memory (one pass or layer groups), spilled to disk, or streamed sums."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from layerif.data.tokens import Batch
from layerif.distributed import DistContext
from layerif.errors import LayerIFError
from layerif.models.blocks import MatrixRef

STRATEGIES = ("auto", "store", "spill", "stream")


def working_bytes(per_layer: Sequence[Sequence[MatrixRef]], activation_bytes: int) -> int:
    """Memory of one pass besides stored factors: one batch's activations plus v and u accumulators."""
    weights = sum(ref.n_params for refs in per_layer for ref in refs)
    return activation_bytes + 2 * weights * 4


def shared_inputs(model, per_layer: Sequence[Sequence[MatrixRef]], batch: Batch) -> set[tuple[int, str]]:
    """(layer, name) of matrices that read the same input tensor as an earlier matrix (q/k/v, gate/up).

    Stored inputs of such matrices share memory, so they are counted once. Found with one short forward.
    """
    import torch

    seen: dict[tuple[int, int], str] = {}
    shared: set[tuple[int, str]] = set()
    handles = []

    def make_hook(ref: MatrixRef):
        def hook(module, args, output):
            key = (ref.layer, args[0].data_ptr())
            if key in seen:
                shared.add((ref.layer, ref.name))
            else:
                seen[key] = ref.name

        return hook

    device = next(model.parameters()).device
    probe = batch.to(device)
    try:
        for refs in per_layer:
            for ref in refs:
                handles.append(ref.module.register_forward_hook(make_hook(ref)))
        with torch.no_grad():
            model(input_ids=probe.input_ids[:1, :4], attention_mask=probe.attention_mask[:1, :4], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return shared


def estimate_factor_bytes(
    per_layer: Sequence[Sequence[MatrixRef]], batches: Sequence[Batch], elem: int,
    shared: set[tuple[int, str]] | None = None,
) -> list[int]:
    """Bytes of the stored gradient factors of each layer over `batches` (padding included)."""
    padded_tokens = sum(int(batch.input_ids.numel()) for batch in batches)
    shared = shared or set()
    return [
        padded_tokens * sum((0 if (ref.layer, ref.name) in shared else ref.d_in) + ref.d_out for ref in refs) * elem
        for refs in per_layer
    ]


@dataclass(frozen=True)
class PassPlan:
    """How a scoring run traverses the data, decided once (by `make_plan`) and recorded as is in run.json.

    `store` keeps factors in memory per layer group (one pass each), `spill` writes every layer's factors
    to disk in one pass and reads them back layer by layer, `stream` keeps weight-sized sums only.
    `groups` holds only the layers still to compute (the rest are in the checkpoint).
    """

    mode: str
    groups: list[list[int]]  # layer groups, one store pass each (spill, stream: one group with every layer)
    passes: int
    reason: str
    factor_bytes: int = 0
    budget_bytes: int = 0
    batch_size: int = 0  # samples per batch of the passes (may be below --batch-size to fit the budget)
    activation_bytes: int = 0  # estimated working memory of one batch's forward+backward
    kernel_bytes: int = 1 << 30  # most bytes of materialised gradients an estimator holds at once
    estimated_cost: dict = field(default_factory=dict)  # cost model per mode, and the disk probe of a spill

    def to_dict(self) -> dict:
        return asdict(self)


def plan_passes(
    estimator: str, pairwise: bool, layer_bytes: Sequence[int], budget_bytes: int, force: str | None = None,
    spill_io_cost: float | None = None,
) -> PassPlan:
    """Cheapest way through the data that fits the budget; cost in units of one forward (a backward costs two).

    `spill_io_cost` is the estimated cost of writing and reading all factors to disk, in the same units;
    None when spilling is not possible (not enough free disk).
    """
    n_layers = len(layer_bytes)
    total = int(sum(layer_bytes))
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    fits = True
    for layer in reversed(range(n_layers)):  # later layers first: their passes need a shorter backward
        if layer_bytes[layer] > budget_bytes:
            fits = False
        if current and used + layer_bytes[layer] > budget_bytes:
            groups.append(sorted(current))
            current, used = [], 0
        current.append(layer)
        used += layer_bytes[layer]
    groups.append(sorted(current))
    store_cost = sum(1 + 2 * (n_layers - min(group)) / n_layers for group in groups)
    stream_passes = {"datainf": 3, "identity": 1}.get(estimator)
    stream_ok = stream_passes is not None and not pairwise
    stream_cost = 3.0 * stream_passes if stream_ok else float("inf")
    # spilled factors are read back one batch chunk at a time, so spilling stays in budget even when
    # one layer's factors alone do not fit
    spill_ok = spill_io_cost is not None and len(groups) > 1
    spill_cost = 3.0 + spill_io_cost if spill_io_cost is not None else float("inf")
    costs = {"store": round(store_cost, 3), "stream": stream_cost if stream_ok else None,
             "spill": round(spill_cost, 3) if spill_io_cost is not None else None}
    common = {"factor_bytes": total, "budget_bytes": int(budget_bytes), "estimated_cost": costs}
    gib = 1 << 30
    if force == "stream" and not stream_ok:
        raise LayerIFError(f"streaming passes support datainf and identity without --pairwise, not {estimator}")
    spill_wins = spill_ok and spill_cost < stream_cost and (spill_cost < store_cost or not fits)
    if force == "spill" or (force is None and spill_wins):
        why = "requested" if force == "spill" else (
            f"factors need {total / gib:.2f} GiB > {budget_bytes / gib:.2f} GiB left for them; one pass writing them to "
            f"disk (estimated cost {spill_cost:.1f}) beats {len(groups)} layer groups ({store_cost:.1f})"
            + (f" and streaming ({stream_cost:.1f})" if stream_ok else "")
            + " in forward-pass units"
        )
        return PassPlan("spill", [list(range(n_layers))], 1, f"spill to disk: {why}", **common)
    if force == "stream" or (force is None and stream_ok and (not fits or stream_cost < store_cost)):
        why = "requested" if force == "stream" else (
            f"factors need {total / gib:.2f} GiB; "
            + ("one layer alone exceeds" if not fits else f"{len(groups)} layer groups would cost more than streaming in")
            + f" the {budget_bytes / gib:.2f} GiB budget"
            + (f"; spilling to disk was estimated at {spill_cost:.1f} vs {stream_cost:.1f}" if spill_io_cost is not None
               else "")
        )
        return PassPlan("stream", [list(range(n_layers))], stream_passes, f"stream sums: {why}", **common)
    if len(groups) == 1:
        why = f"all factors ({total / gib:.2f} GiB) fit the {budget_bytes / gib:.2f} GiB budget"
    else:
        why = f"factors need {total / gib:.2f} GiB > {budget_bytes / gib:.2f} GiB budget: {len(groups)} layer groups"
        if not fits:
            why += " (one layer alone exceeds the budget; it gets a pass to itself)"
    return PassPlan("store", groups, len(groups), why, **common)


@dataclass
class PlanInputs:
    """What the plan is decided from (the scored model, its matrices, how batches are made, the settings)."""

    model: nn.Module
    per_layer: Sequence[Sequence[MatrixRef]]
    # batch size -> (every training batch, this rank's training batches, this rank's validation batches)
    batches_of: Callable[[int], tuple[list[Batch], list[Batch], list[Batch]]]
    estimator: str = "datainf"
    pairwise: bool = False
    batch_size: int = 8
    budget_bytes: int | None = None  # None: half the memory free now on the model's device
    strategy: str = "auto"
    done_layers: frozenset[int] = frozenset()  # layers already in the checkpoint
    spill_dir: str | None = None
    dist: DistContext = field(default_factory=DistContext)


def default_budget(device: torch.device) -> int:
    """Half of the memory free right now on the device that will hold the stored gradients."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    import psutil

    return int(psutil.virtual_memory().available * 0.5)


def make_plan(inputs: PlanInputs) -> PassPlan:
    """The complete plan of a run: batch size, mode, layer groups, disk probe, checkpoint remainder, reason.

    One forward of the longest sample measures a batch's working memory and the forward speed; the batch
    shrinks when its activations would take more than half the budget (results do not depend on it).
    Every rank gets rank 0's plan.
    """
    from layerif.gradients.passes import measure_pass

    model, per_layer = inputs.model, inputs.per_layer
    device = next(model.parameters()).device
    budget = inputs.budget_bytes or default_budget(device)
    all_train, train, val = inputs.batches_of(inputs.batch_size)
    longest = all_train[0]
    bytes_per_sample, probe_s = measure_pass(model, longest.rows(slice(0, 1)))
    forward_s_per_token = probe_s / max(int(longest.input_ids[:1].numel()), 1)
    batch_size = inputs.batch_size
    if bytes_per_sample * batch_size > budget // 2 and batch_size > 1:
        batch_size = max(1, min(batch_size, int(budget // 2 // max(bytes_per_sample, 1))))
    batch_size = inputs.dist.broadcast_object(batch_size)
    if batch_size != inputs.batch_size:
        all_train, train, val = inputs.batches_of(batch_size)
    activation = int(bytes_per_sample * max(len(batch.index) for batch in all_train))
    elem = next(model.parameters()).element_size()
    shared = shared_inputs(model, per_layer, all_train[0])
    layer_bytes = estimate_factor_bytes(per_layer, train, elem, shared)
    val_bytes = estimate_factor_bytes(per_layer, val, elem, shared)
    if inputs.pairwise:
        layer_bytes = [a + b for a, b in zip(layer_bytes, val_bytes)]
    working = working_bytes(per_layer, activation)
    remaining = [layer for layer in range(len(per_layer)) if layer not in inputs.done_layers]
    remaining_bytes = [layer_bytes[layer] for layer in remaining] or [0]
    store_budget = max(budget - working, 1)
    io_cost, probe = None, {}
    if remaining and inputs.strategy in ("auto", "spill") and sum(remaining_bytes) > store_budget:
        # a spill writes the validation factors too (already in layer_bytes with pairwise)
        disk_bytes = sum(remaining_bytes) + (0 if inputs.pairwise else sum(val_bytes[layer] for layer in remaining))
        io_cost, probe = spill_io_cost(forward_s_per_token, train, disk_bytes, inputs.spill_dir,
                                       forced=inputs.strategy == "spill")
    decided = plan_passes(inputs.estimator, inputs.pairwise, remaining_bytes, store_budget,
                          None if inputs.strategy == "auto" else inputs.strategy, io_cost)
    mode, reason = decided.mode, decided.reason
    groups = [[remaining[i] for i in group] for group in decided.groups] if remaining else []
    if not remaining:
        mode, reason = "store", "every layer was already in the checkpoint"
    passes = len(groups) if mode == "store" else (decided.passes if remaining else 0)
    if batch_size != inputs.batch_size:
        reason += (f"; batches of {batch_size} instead of {inputs.batch_size} samples so that one batch's "
                   f"activations (~{activation / (1 << 30):.2f} GiB) stay within half the budget")
    if mode != "store" or len(groups) > 1:
        reason += (f" (of the {budget / (1 << 30):.2f} GiB --max-memory, {min(working, budget) / (1 << 30):.2f} GiB"
                   " is set aside for activations and weight-sized sums)")
    plan = replace(decided, mode=mode, groups=groups, passes=passes, reason=reason, budget_bytes=budget,
                   batch_size=batch_size, activation_bytes=activation,
                   kernel_bytes=max(min(budget // 4, 4 << 30), 64 << 20),
                   estimated_cost={**decided.estimated_cost, **probe})
    return inputs.dist.broadcast_object(plan)  # every rank must run the same passes


def spill_io_cost(forward_s_per_token: float, batches: Sequence[Batch], factor_bytes: int, spill_dir: str | None,
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
