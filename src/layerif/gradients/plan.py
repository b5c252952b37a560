"""Decide how gradients are kept: factors in memory (one pass or layer groups), spilled to disk, or streamed sums."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from layerif.data.tokens import Batch
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


@dataclass
class PassPlan:
    """How a scoring run traverses the data.

    `store` keeps factors in memory per layer group (one pass each), `spill` writes every layer's factors
    to disk in one pass and reads them back layer by layer, `stream` keeps weight-sized sums only.
    """

    mode: str
    groups: list[list[int]]  # layer groups, one store pass each (spill, stream: one group with every layer)
    passes: int
    reason: str
    factor_bytes: int = 0
    budget_bytes: int = 0
    batch_size: int = 0  # samples per batch of the passes (may be below --batch-size to fit the budget)
    activation_bytes: int = 0  # estimated working memory of one batch's forward+backward
    estimated_cost: dict = field(default_factory=dict)

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
        from layerif.errors import LayerIFError

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
