"""Run the passes a plan asks for and return each matrix's influence on each training sample."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from layerif.checkpoint import Checkpoint
from layerif.data.tokens import Batch
from layerif.distributed import DistContext
from layerif.errors import LayerIFError
from layerif.gradients.factors import FactorChunk, MatrixFactors, chunk_sq_norms, chunk_weighted_sum
from layerif.gradients.passes import run_pass
from layerif.gradients.plan import PassPlan
from layerif.influence.estimators import influence_from_factors
from layerif.influence.streaming import StreamingInfluence
from layerif.models.blocks import MatrixRef


@dataclass
class InfluenceResult:
    """Influence I (Koh & Liang sign) of every matrix on every training sample."""

    influence: list[list[torch.Tensor]]  # [layer][matrix] -> (n,) float64
    pairwise: list[torch.Tensor] | None  # [layer] -> (n, m) float64, summed over the layer's matrices
    damping: list[list[float]]  # [layer][matrix]
    train_passes: int
    left_out_train: dict[int, str] = field(default_factory=dict)  # sample -> where its loss/gradient went non-finite
    left_out_val: dict[int, str] = field(default_factory=dict)


class LeftOut:
    """Samples left out of a run because their loss or gradient is not finite (only with skip_nonfinite)."""

    def __init__(self, enabled: bool, n_train: int, dist: DistContext):
        self.enabled = enabled
        self.n_train = n_train
        self.dist = dist
        self.train: dict[int, str] = {}
        self.val: dict[int, str] = {}
        self.from_checkpoint = torch.zeros(n_train, dtype=torch.bool)

    def first_layer(self, layer: int) -> int:
        """Backward start: every pass goes down to block 0 when skipping, so all passes leave out the same samples."""
        return 0 if self.enabled else layer

    def mask(self) -> torch.Tensor:
        """(n_train,) bool: left out on any rank or in a checkpointed unit. Collective when distributed."""
        local = torch.zeros(self.n_train, dtype=torch.float64)
        if self.train:
            local[list(self.train)] = 1.0
        return (self.dist.all_reduce_sum(local) > 0) | self.from_checkpoint

    def n_effective(self) -> int | None:
        """Training samples taking part (None when not skipping: all of them)."""
        if not self.enabled:
            return None
        n = self.n_train - int(self.mask().sum())
        if n == 0:
            raise LayerIFError("every training sample has a non-finite loss or gradient; nothing to score")
        return n


def _x_gram(x: torch.Tensor, cache: dict) -> torch.Tensor:
    """X X^T per sample, shared by matrices that read the same input (q/k/v, gate/up)."""
    entry = cache.get(id(x))
    if entry is None or entry[0] is not x:
        entry = (x, torch.bmm(x, x.transpose(1, 2)))
        cache[id(x)] = entry  # holding x keeps its id from being reused within the batch
    return entry[1]


def compute_influence(
    model: nn.Module,
    per_layer: Sequence[Sequence[MatrixRef]],
    train_batches: Sequence[Batch],
    val_batches: Sequence[Batch],
    n_train: int,
    n_val: int,
    estimator: str,
    pairwise: bool,
    plan: PassPlan,
    compute_dtype: torch.dtype = torch.float32,
    quiet: bool = False,
    kernel_bytes: int = 1 << 30,
    checkpoint: Checkpoint | None = None,
    dist: DistContext | None = None,
    spill_dir: str | None = None,
    skip_nonfinite: bool = False,
) -> InfluenceResult:
    """Influence of each training sample through each selected matrix, following `plan`.

    Layers already saved in `checkpoint` are loaded instead of computed (the plan should cover only
    the others); each finished layer, and each finished streaming pass, is saved to it. A `spill` plan
    writes its factor files under `spill_dir` (default: the system's temporary directory).
    With `skip_nonfinite`, samples whose loss or gradient is not finite are left out of every sum (as if
    absent from the data) instead of stopping the run; the result lists them.
    """
    influence: list[list[torch.Tensor | None]] = [[None] * len(refs) for refs in per_layer]
    damping_values: list[list[float]] = [[0.0] * len(refs) for refs in per_layer]
    pair: list[torch.Tensor | None] | None = [None] * len(per_layer) if pairwise else None
    dist = dist or DistContext()
    slot_of = {(ref.layer, ref.name): slot for refs in per_layer for slot, ref in enumerate(refs)}
    left_out = LeftOut(skip_nonfinite, n_train, dist)
    planned = {layer for group in plan.groups for layer in group}
    for layer in range(len(per_layer)):
        if layer in planned:
            continue
        if checkpoint is None or not checkpoint.has(layer_unit(layer)):
            raise RuntimeError(f"layer {layer} is neither planned nor checkpointed")
        saved = checkpoint.load(layer_unit(layer))
        influence[layer] = list(saved["influence"].double().unbind(0))
        damping_values[layer] = saved["damping"].double().tolist()
        if pair is not None:
            pair[layer] = saved["pairwise"].double()
        if "left_out" in saved:
            left_out.from_checkpoint |= saved["left_out"].bool()

    def save_layer(layer: int) -> None:
        if checkpoint is None:
            return
        tensors = {"influence": torch.stack(influence[layer]), "damping": torch.tensor(damping_values[layer])}
        if left_out.enabled:
            tensors["left_out"] = left_out.mask().to(torch.uint8)
        if pair is not None:
            tensors["pairwise"] = pair[layer]
        checkpoint.save(layer_unit(layer), tensors)
    train_left_out = left_out.train if left_out.enabled else None
    val_left_out = left_out.val if left_out.enabled else None
    train_name = lambda i: f"training sample {i}"  # noqa: E731
    val_name = lambda i: f"validation sample {i}"  # noqa: E731

    if plan.mode == "stream":
        layers = plan.groups[0]
        refs = [ref for layer in layers for ref in per_layer[layer]]
        first_layer = left_out.first_layer(min(layers))
        stream = StreamingInfluence(estimator, [(r.d_out, r.d_in) for r in refs], n_train, compute_dtype)
        total = stream.passes
        key = "stream-" + "-".join(map(str, layers)) if len(layers) < 8 else f"stream-{min(layers)}-{max(layers)}-{len(layers)}"
        if checkpoint is not None and checkpoint.has(f"{key}-pass1"):
            saved = checkpoint.load(f"{key}-pass1")
            stream.sq, stream.gv = saved["sq"].double(), saved["gv"].double()
            if "left_out" in saved:
                left_out.from_checkpoint |= saved["left_out"].bool()
        else:
            run_pass(model, val_batches, refs, stream.consume_val, first_layer, "validation gradients", quiet,
                     val_name, left_out.val if left_out.enabled else None)
            for position, ref in enumerate(refs):
                if stream.v[position] is None:
                    stream.v[position] = torch.zeros(ref.d_out, ref.d_in, dtype=compute_dtype,
                                                     device=next(model.parameters()).device)
                stream.v[position] = dist.all_reduce_sum(stream.v[position])
            run_pass(model, train_batches, refs, stream.consume_first, first_layer, f"pass 1/{total} (norms, g.v)",
                     quiet, train_name, train_left_out)
            dist.all_reduce_sum(stream.sq)
            dist.all_reduce_sum(stream.gv)
            if checkpoint is not None and estimator != "identity":
                saved_pass = {"sq": stream.sq, "gv": stream.gv}
                if left_out.enabled:
                    saved_pass["left_out"] = left_out.mask().to(torch.uint8)
                checkpoint.save(f"{key}-pass1", saved_pass)
        stream.n_effective = left_out.n_effective() or n_train
        stream.v = [None] * len(refs)  # not needed after pass 1
        if estimator != "identity":
            stream.finish_first()
            if checkpoint is not None and checkpoint.has(f"{key}-pass2"):
                saved = checkpoint.load(f"{key}-pass2")
                device = next(model.parameters()).device
                stream.u = [saved[f"u.{i}"].to(device) for i in range(len(refs))]
            else:
                run_pass(model, train_batches, refs, stream.consume_second, first_layer,
                         f"pass 2/{total} (sum c g)", quiet, train_name, train_left_out)
                for position, ref in enumerate(refs):
                    if stream.u[position] is None:
                        stream.u[position] = torch.zeros(ref.d_out, ref.d_in, dtype=compute_dtype,
                                                         device=next(model.parameters()).device)
                    stream.u[position] = dist.all_reduce_sum(stream.u[position])
                if checkpoint is not None:
                    checkpoint.save(f"{key}-pass2", {f"u.{i}": u for i, u in enumerate(stream.u)})
            run_pass(model, train_batches, refs, stream.consume_third, first_layer, f"pass 3/{total} (g.u)", quiet,
                     train_name, train_left_out)
            dist.all_reduce_sum(stream.gu)
        values = stream.influence()
        for position, ref in enumerate(refs):
            slot = slot_of[(ref.layer, ref.name)]
            influence[ref.layer][slot] = values[position]
            damping_values[ref.layer][slot] = float(stream.lam[position])
        for layer in layers:
            save_layer(layer)
        return _result(influence, None, damping_values, total, left_out)

    if plan.mode == "spill":
        _spilled_influence(model, per_layer, train_batches, val_batches, n_train, n_val, estimator, pairwise,
                           plan.groups[0] if plan.groups else [], compute_dtype, quiet, kernel_bytes, dist,
                           spill_dir, influence, damping_values, pair, slot_of, save_layer, left_out)
        return _result(influence, pair, damping_values, 1 if plan.groups else 0, left_out)

    for group_number, group in enumerate(plan.groups):
        refs = [ref for layer in group for ref in per_layer[layer]]
        first_layer = left_out.first_layer(min(group))
        label = f"pass {group_number + 1}/{len(plan.groups)}"
        val_sum: list[torch.Tensor | None] = [None] * len(refs)
        val_factors = [MatrixFactors(n_val, r.d_in, r.d_out, compute_dtype) for r in refs] if pairwise else None
        train_factors = [MatrixFactors(n_train, r.d_in, r.d_out, compute_dtype) for r in refs]

        sum_val = _consume_val(val_sum, compute_dtype)

        def consume_val(position, batch, x, delta, cache):
            sum_val(position, batch, x, delta, cache)
            if val_factors is not None:
                val_factors[position].add(FactorChunk(batch.index, x, delta), torch.zeros(len(batch.index)))

        def consume_train(position, batch, x, delta, cache):
            sq = _train_sq_norms(x, delta, refs[position], compute_dtype, cache)
            train_factors[position].add(FactorChunk(batch.index, x, delta), sq)

        run_pass(model, val_batches, refs, consume_val, first_layer, f"{label} validation", quiet, val_name,
                 val_left_out)
        run_pass(model, train_batches, refs, consume_train, first_layer, f"{label} training", quiet, train_name,
                 train_left_out)
        n_effective = left_out.n_effective()
        device = next(model.parameters()).device
        for position, ref in enumerate(refs):
            if val_sum[position] is None:
                val_sum[position] = torch.zeros(ref.d_out, ref.d_in, dtype=compute_dtype, device=device)
            val_sum[position] = dist.all_reduce_sum(val_sum[position])
            dist.all_reduce_sum(train_factors[position].sq_norms)
        from tqdm.auto import tqdm

        for position, ref in enumerate(tqdm(refs, desc=f"{label} {estimator}", disable=quiet, leave=False,
                                            unit="matrix", dynamic_ncols=True)):
            val_each = _each_gradient(val_factors[position]) if val_factors is not None else None
            values, values_pair, lam = influence_from_factors(
                estimator, train_factors[position], val_sum[position], val_each, max_bytes=kernel_bytes,
                reduce=dist.all_reduce_sum, n_effective=n_effective,
            )
            slot = slot_of[(ref.layer, ref.name)]
            influence[ref.layer][slot] = values
            damping_values[ref.layer][slot] = lam
            if pair is not None:
                pair[ref.layer] = values_pair if pair[ref.layer] is None else pair[ref.layer] + values_pair
            train_factors[position] = None  # free as we go
            if val_factors is not None:
                val_factors[position] = None
        for layer in group:
            save_layer(layer)
    return _result(influence, pair, damping_values, len(plan.groups) if plan.mode == "store" else 0, left_out)


def _result(influence, pair, damping_values, passes: int, left_out: LeftOut) -> InfluenceResult:
    train = dict(left_out.train)
    if left_out.enabled:
        for sample in left_out.mask().nonzero().flatten().tolist():
            train.setdefault(sample, "non-finite (found on another rank or in an earlier, checkpointed run)")
    return InfluenceResult(influence, pair, damping_values, passes, dict(sorted(train.items())),
                           dict(sorted(left_out.val.items())))


def _each_gradient(factors: MatrixFactors) -> torch.Tensor:
    """Every sample's gradient of one matrix, in sample order: (n, d_out, d_in) (for the pairwise matrix)."""
    index, grads = next(factors.materialised(max_bytes=1 << 62))
    ordered = torch.empty_like(grads)
    ordered[index] = grads
    return ordered.view(factors.n, factors.d_out, factors.d_in)


def _consume_val(val_sum: list, compute_dtype: torch.dtype):
    """Consumer adding each validation batch's gradient sum to val_sum[position]."""
    def consume(position, batch, x, delta, cache):
        xc, dc = x.to(compute_dtype), delta.to(compute_dtype)
        part = chunk_weighted_sum(xc, dc, torch.ones(x.shape[0], dtype=compute_dtype, device=x.device))
        val_sum[position] = part if val_sum[position] is None else val_sum[position] + part

    return consume


def _train_sq_norms(x: torch.Tensor, delta: torch.Tensor, ref: MatrixRef, compute_dtype, cache: dict) -> torch.Tensor:
    xc, dc = x.to(compute_dtype), delta.to(compute_dtype)
    cheap_gram = x.shape[1] * (ref.d_in + ref.d_out) <= ref.d_in * ref.d_out
    return chunk_sq_norms(xc, dc, _x_gram(xc, cache) if cheap_gram else None)


def _spilled_influence(model, per_layer, train_batches, val_batches, n_train, n_val, estimator, pairwise, layers,
                       compute_dtype, quiet, kernel_bytes, dist, spill_dir, influence, damping_values, pair,
                       slot_of, save_layer, left_out: LeftOut) -> None:
    """One validation and one training pass writing factors to disk, then each layer scored from its files.

    Validation factors go to disk too (v is summed per layer when it is scored), so neither pass holds
    weight-sized sums of every layer at once.
    """
    from tqdm.auto import tqdm

    from layerif.gradients.spill import SpillStore

    if not layers:
        return
    refs = [ref for layer in layers for ref in per_layer[layer]]
    first_layer = left_out.first_layer(min(layers))
    store = SpillStore(spill_dir, prefix=f"rank{dist.rank}")
    try:
        def consume_val(position, batch, x, delta, cache):
            store.write("val", refs[position].layer, position, batch.index, x, delta, cache)

        sq_norms = torch.zeros(len(refs), n_train, dtype=torch.float64)

        def consume_train(position, batch, x, delta, cache):
            sq_norms[position, batch.index] = _train_sq_norms(x, delta, refs[position], compute_dtype,
                                                              cache).double().cpu()
            store.write("train", refs[position].layer, position, batch.index, x, delta, cache)

        run_pass(model, val_batches, refs, consume_val, first_layer, "validation (spill to disk)", quiet,
                 lambda i: f"validation sample {i}", left_out.val if left_out.enabled else None)
        run_pass(model, train_batches, refs, consume_train, first_layer, "training (spill to disk)", quiet,
                 lambda i: f"training sample {i}", left_out.train if left_out.enabled else None)
        store.finish_writing()
        n_effective = left_out.n_effective()
        dist.all_reduce_sum(sq_norms)
        device = next(model.parameters()).device
        positions_of = {layer: [p for p, ref in enumerate(refs) if ref.layer == layer] for layer in layers}
        for layer in tqdm(layers, desc=f"{estimator} from disk", disable=quiet, leave=False, unit="layer",
                          dynamic_ncols=True):
            for position in positions_of[layer]:
                ref = refs[position]
                val_factors = store.factors("val", layer, position, n_val, ref.d_in, ref.d_out, compute_dtype,
                                            torch.zeros(n_val, dtype=torch.float64))
                v = dist.all_reduce_sum(val_factors.weighted_sum(torch.ones(n_val, dtype=compute_dtype)).to(device))
                factors = store.factors("train", layer, position, n_train, ref.d_in, ref.d_out, compute_dtype,
                                        sq_norms[position])
                val_each = _each_gradient(val_factors) if pairwise else None
                values, values_pair, lam = influence_from_factors(
                    estimator, factors, v, val_each, max_bytes=kernel_bytes, reduce=dist.all_reduce_sum,
                    n_effective=n_effective)
                slot = slot_of[(ref.layer, ref.name)]
                influence[layer][slot] = values
                damping_values[layer][slot] = lam
                if pair is not None:
                    pair[layer] = values_pair if pair[layer] is None else pair[layer] + values_pair
            store.drop_layer(layer)
            save_layer(layer)
    finally:
        store.close()


def layer_unit(layer: int) -> str:
    """Checkpoint unit name of one finished layer."""
    return f"layer-{layer:04d}"
