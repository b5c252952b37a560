"""Run the passes a plan asks for and return each matrix's influence on each training sample.

Three strategies share one interface (`Strategy.run(plan) -> training passes`) and write into one
`ResultSink`: `Store` keeps factors in memory per layer group, `Spill` writes them to disk in one pass and
scores layer by layer from the files, `Stream` keeps weight-sized sums only (three passes for DataInf).
Store and Spill hand every matrix to the same estimator step (`influence_from_factors`); with several estimators
(`ScoringJob.estimator` a comma list) each of them scores the same captured factors into a sink of its own,
checkpointed per estimator.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from layerif.checkpoint import Checkpoint
from layerif.data.tokens import Batch
from layerif.errors import LayerIFError
from layerif.gradients.context import RunContext
from layerif.gradients.factors import (
    FactorChunk,
    MatrixFactors,
    chunk_sq_norms,
    chunk_weighted_sum,
    device_index,
)
from layerif.gradients.passes import PassSpec, run_pass
from layerif.gradients.plan import PassPlan
from layerif.influence.estimators import MatrixInfluence, MatrixInputs, influence_from_factors
from layerif.influence.streaming import StreamingInfluence
from layerif.models.blocks import MatrixRef


@dataclass
class ScoringJob:
    """What one run scores: the model, its selected matrices per layer, this rank's batches, the method."""

    model: nn.Module
    per_layer: Sequence[Sequence[MatrixRef]]
    train_batches: Sequence[Batch]
    val_batches: Sequence[Batch]
    n_train: int  # training samples over every rank
    n_val: int
    estimator: str = "datainf"  # one name, or a comma list: every estimator scores the same captured factors
    pairwise: bool = False
    estimator_options: dict = field(default_factory=dict)  # LiSSA's depth, tolerance, scale and seed

    @property
    def estimators(self) -> list[str]:
        """The estimator names, in the order given."""
        return self.estimator.split(",")


@dataclass
class InfluenceResult:
    """Influence I (Koh & Liang sign) of every matrix on every training sample."""

    influence: list[list[torch.Tensor]]  # [layer][matrix] -> (n,) float64
    pairwise: list[torch.Tensor] | None  # [layer] -> (n, m) float64, summed over the layer's matrices
    damping: list[list[float]]  # [layer][matrix]
    train_passes: int
    left_out_train: dict[int, str] = field(default_factory=dict)  # sample -> where its loss/gradient went non-finite
    left_out_val: dict[int, str] = field(default_factory=dict)
    estimator_info: dict[str, dict] = field(default_factory=dict)  # "layer.matrix" -> what the solver reported
    estimator_s: float = 0.0  # time spent in this estimator's steps (Store and Spill)


class LeftOut:
    """Samples left out of a run because their loss or gradient is not finite (only with the skip policy)."""

    def __init__(self, n_train: int, ctx: RunContext):
        self.enabled = ctx.skip_nonfinite
        self.n_train = n_train
        self.dist = ctx.dist
        self.train: dict[int, str] = {}
        self.val: dict[int, str] = {}
        self.from_checkpoint = torch.zeros(n_train, dtype=torch.bool)

    def first_layer(self, layer: int) -> int:
        """Backward start: every pass goes down to block 0 when skipping, so all passes leave out the same samples."""
        return 0 if self.enabled else layer

    def spec(self, desc: str, what: str, layers: Sequence[int]) -> PassSpec:
        """The pass over the `what` ("training" / "validation") samples for matrices of `layers`."""
        skipped = (self.train if what == "training" else self.val) if self.enabled else None
        return PassSpec(desc, what, self.first_layer(min(layers)), skipped)

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


class ResultSink:
    """Where every strategy writes: influence and damping per matrix, pairwise per layer, left-out samples.

    Finished layers (and finished streaming passes) are saved to the checkpoint; saved ones are loaded back.
    """

    def __init__(self, job: ScoringJob, ctx: RunContext, checkpoint: Checkpoint | None = None,
                 estimator: str | None = None, left_out: LeftOut | None = None):
        self.checkpoint = checkpoint
        self.estimator = estimator or job.estimator
        self.unit_suffix = self.estimator if len(job.estimators) > 1 else None  # one estimator: plain unit names
        self.influence: list[list[torch.Tensor | None]] = [[None] * len(refs) for refs in job.per_layer]
        self.damping: list[list[float]] = [[0.0] * len(refs) for refs in job.per_layer]
        self.pair: list[torch.Tensor | None] | None = [None] * len(job.per_layer) if job.pairwise else None
        self.slot_of = {(ref.layer, ref.name): slot for refs in job.per_layer for slot, ref in enumerate(refs)}
        self.left_out = left_out or LeftOut(job.n_train, ctx)
        self.estimator_info: dict[str, dict] = {}
        self.done: set[int] = set()  # layers loaded from the checkpoint
        self.seconds = 0.0

    def load_unit(self, name: str) -> dict | None:
        """A saved checkpoint unit (None when absent); its left-out samples join this run's."""
        if self.checkpoint is None or not self.checkpoint.has(name):
            return None
        saved = self.checkpoint.load(name)
        if "left_out" in saved:
            self.left_out.from_checkpoint |= saved["left_out"].bool()
        return saved

    def save_unit(self, name: str, tensors: dict) -> None:
        """Save a finished unit (with the samples left out so far) when checkpointing."""
        if self.checkpoint is None:
            return
        if self.left_out.enabled:
            tensors = {**tensors, "left_out": self.left_out.mask().to(torch.uint8)}
        self.checkpoint.save(name, tensors)

    def load_layers(self, planned: set[int]) -> None:
        """Fill every layer this estimator finished from the checkpoint (the plan leaves out only layers all did)."""
        for layer in range(len(self.influence)):
            saved = self.load_unit(layer_unit(layer, self.unit_suffix))
            if saved is None:
                if layer not in planned:
                    raise RuntimeError(f"layer {layer} is neither planned nor checkpointed")
                continue
            self.done.add(layer)
            self.influence[layer] = list(saved["influence"].double().unbind(0))
            self.damping[layer] = saved["damping"].double().tolist()
            if self.pair is not None:
                self.pair[layer] = saved["pairwise"].double()

    def put(self, ref: MatrixRef, result: MatrixInfluence) -> None:
        """Record one matrix's influence, damping and (summed into its layer's) pairwise matrix."""
        slot = self.slot_of[(ref.layer, ref.name)]
        self.influence[ref.layer][slot] = result.values
        self.damping[ref.layer][slot] = result.damping
        if result.info:
            self.estimator_info[f"{ref.layer}.{ref.name}"] = result.info
        if self.pair is not None and result.pairwise is not None:
            held = self.pair[ref.layer]
            self.pair[ref.layer] = result.pairwise if held is None else held + result.pairwise

    def finish_layer(self, layer: int) -> None:
        """Every matrix of `layer` is in: save the layer."""
        tensors = {"influence": torch.stack(self.influence[layer]), "damping": torch.tensor(self.damping[layer])}
        if self.pair is not None:
            tensors["pairwise"] = self.pair[layer]
        self.save_unit(layer_unit(layer, self.unit_suffix), tensors)

    def result(self, passes: int) -> InfluenceResult:
        """Everything collected, with the left-out samples of every rank and of checkpointed units."""
        train = dict(self.left_out.train)
        if self.left_out.enabled:
            for sample in self.left_out.mask().nonzero().flatten().tolist():
                train.setdefault(sample, "non-finite (found on another rank or in an earlier, checkpointed run)")
        return InfluenceResult(self.influence, self.pair, self.damping, passes, dict(sorted(train.items())),
                               dict(sorted(self.left_out.val.items())), self.estimator_info, self.seconds)


class Strategy:
    """One way through the data: `run(plan)` puts every matrix of the planned layers into the sink."""

    def __init__(self, job: ScoringJob, ctx: RunContext, sinks: dict[str, ResultSink]):
        self.job, self.ctx, self.sinks = job, ctx, sinks
        self.sink = next(iter(sinks.values()))  # the first estimator's; the left-out samples are shared

    def run(self, plan: PassPlan) -> int:
        """Score the plan's layers; return the number of training passes."""
        raise NotImplementedError

    def refs(self, layers: Sequence[int]) -> list[MatrixRef]:
        return [ref for layer in layers for ref in self.job.per_layer[layer]]

    def traverse(self, what: str, refs: Sequence[MatrixRef], consume, desc: str) -> None:
        """One pass over this rank's `what` ("training" / "validation") batches."""
        batches = self.job.train_batches if what == "training" else self.job.val_batches
        layers = sorted({ref.layer for ref in refs})
        run_pass(self.job.model, batches, refs, consume, self.ctx, self.sink.left_out.spec(desc, what, layers))

    def pending(self, layer: int) -> list[str]:
        """The estimators that still have to score `layer` (the others have it from the checkpoint)."""
        return [name for name, sink in self.sinks.items() if layer not in sink.done]

    def score_matrix(self, ref: MatrixRef, inputs: MatrixInputs, names: Sequence[str] | None = None) -> None:
        """The per-matrix estimator step, shared by Store and Spill: each pending estimator on the same factors."""
        for name in self.pending(ref.layer) if names is None else names:
            started = time.perf_counter()
            result = influence_from_factors(name, inputs, self.ctx, self.job.estimator_options)
            sink = self.sinks[name]
            sink.seconds += time.perf_counter() - started
            sink.put(ref, result)

    def finish_layer(self, layer: int, names: Sequence[str] | None = None) -> None:
        """Save `layer` for each estimator that has just scored it."""
        for name in self.pending(layer) if names is None else names:
            self.sinks[name].finish_layer(layer)


class _SquaredNorms:
    """||g_i||^2 of every matrix and sample, accumulated on the device while factors are captured."""

    def __init__(self, refs: Sequence[MatrixRef], n: int, ctx: RunContext):
        self.refs, self.ctx = refs, ctx
        self.values = torch.zeros(len(refs), n, dtype=torch.float64, device=ctx.device)

    def add(self, position: int, batch: Batch, x: torch.Tensor, delta: torch.Tensor, cache: dict) -> None:
        xc, dc = x.to(self.ctx.compute_dtype), delta.to(self.ctx.compute_dtype)
        ref = self.refs[position]
        cheap_gram = x.shape[1] * (ref.d_in + ref.d_out) <= ref.d_in * ref.d_out
        norms = chunk_sq_norms(xc, dc, _x_gram(xc, cache) if cheap_gram else None)
        self.values[position, device_index(batch, cache, x.device)] = norms.double()

    def reduced(self) -> torch.Tensor:
        """(n_matrices, n) over every rank, on the host."""
        return self.ctx.dist.all_reduce_sum(self.values).cpu()


def _x_gram(x: torch.Tensor, cache: dict) -> torch.Tensor:
    """X X^T per sample, shared by matrices that read the same input (q/k/v, gate/up)."""
    entry = cache.get(id(x))
    if entry is None or entry[0] is not x:
        entry = (x, torch.bmm(x, x.transpose(1, 2)))
        cache[id(x)] = entry  # holding x keeps its id from being reused within the batch
    return entry[1]


class Store(Strategy):
    """Factors in memory, one validation and one training pass per layer group."""

    def run(self, plan: PassPlan) -> int:
        for number, group in enumerate(plan.groups):
            self._run_group(group, f"pass {number + 1}/{len(plan.groups)}")
        return len(plan.groups)

    def _run_group(self, group: Sequence[int], label: str) -> None:
        job, ctx = self.job, self.ctx
        refs = self.refs(group)
        val_sums: list[torch.Tensor | None] = [None] * len(refs)
        val_factors = [MatrixFactors(job.n_val, r.d_in, r.d_out, ctx.compute_dtype) for r in refs] if job.pairwise else None
        train_factors: list[MatrixFactors | None] = [MatrixFactors(job.n_train, r.d_in, r.d_out, ctx.compute_dtype)
                                                     for r in refs]
        norms = _SquaredNorms(refs, job.n_train, ctx)

        def consume_val(position, batch, x, delta, cache):
            part = chunk_weighted_sum(x.to(ctx.compute_dtype), delta.to(ctx.compute_dtype),
                                      torch.ones(x.shape[0], dtype=ctx.compute_dtype, device=x.device))
            val_sums[position] = part if val_sums[position] is None else val_sums[position] + part
            if val_factors is not None:
                val_factors[position].chunks.append(FactorChunk(batch.index, x, delta))

        def consume_train(position, batch, x, delta, cache):
            norms.add(position, batch, x, delta, cache)
            train_factors[position].chunks.append(FactorChunk(batch.index, x, delta))

        self.traverse("validation", refs, consume_val, f"{label} validation")
        self.traverse("training", refs, consume_train, f"{label} training")
        n_effective = self.sink.left_out.n_effective()
        v = ctx.reduced_sums(val_sums, [(r.d_out, r.d_in) for r in refs])
        sq = norms.reduced()
        for position in range(len(refs)):
            train_factors[position].sq_norms = sq[position]
        pending = {layer: self.pending(layer) for layer in group}
        names = [name for name in job.estimators if any(name in wanted for wanted in pending.values())]
        last_use = {position: max((names.index(name) for name in pending[ref.layer]), default=-1)
                    for position, ref in enumerate(refs)}
        # one estimator at a time over the group, so that each one's layers are saved as soon as it is done
        for number, name in enumerate(names):
            mine = [position for position, ref in enumerate(refs) if name in pending[ref.layer]]
            with ctx.progress(len(mine), f"{label} {name}", unit="matrix") as bar:
                for position in mine:
                    each = _each_gradient(val_factors[position]) if val_factors is not None else None
                    self.score_matrix(refs[position], MatrixInputs(train_factors[position], v[position], each,
                                                                   n_effective), [name])
                    if last_use[position] == number:  # freed as we go
                        train_factors[position] = None
                        if val_factors is not None:
                            val_factors[position] = None
                    bar.update(1)
            for layer in group:
                if name in pending[layer]:
                    self.finish_layer(layer, [name])


class Spill(Strategy):
    """One validation and one training pass writing factors to disk, then each layer scored from its files.

    Validation factors go to disk too (v is summed per layer when it is scored), so neither pass holds
    weight-sized sums of every layer at once.
    """

    def run(self, plan: PassPlan) -> int:
        from layerif.gradients.spill import SpillCorrupt

        layers, done = list(plan.groups[0]) if plan.groups else [], []
        try:
            return self._run_layers(layers, done)
        except SpillCorrupt as exc:  # a damaged file is never used: redo its layers once (one rank only)
            if self.ctx.dist.enabled:
                raise
            print(f"warning: {exc}; recomputing layers {', '.join(map(str, sorted(set(layers) - set(done))))}",
                  file=sys.stderr)
            return 1 + self._run_layers([layer for layer in layers if layer not in done], [])

    def _run_layers(self, layers: list[int], done: list[int]) -> int:
        from layerif.gradients.spill import SpillStore

        if not layers:
            return 0
        refs = self.refs(layers)
        store = SpillStore(self.ctx.spill_dir, prefix=f"rank{self.ctx.dist.rank}")
        try:
            norms = _SquaredNorms(refs, self.job.n_train, self.ctx)

            def consume_val(position, batch, x, delta, cache):
                store.write("val", refs[position].layer, position, FactorChunk(batch.index, x, delta), cache)

            def consume_train(position, batch, x, delta, cache):
                norms.add(position, batch, x, delta, cache)
                store.write("train", refs[position].layer, position, FactorChunk(batch.index, x, delta), cache)

            self.traverse("validation", refs, consume_val, "validation (spill to disk)")
            self.traverse("training", refs, consume_train, "training (spill to disk)")
            store.finish_writing()
            self._score_from_disk(store, refs, layers, norms.reduced(), done)
        finally:
            store.close()
        return 1

    def _score_from_disk(self, store, refs: Sequence[MatrixRef], layers: Sequence[int], sq: torch.Tensor,
                         done: list[int]) -> None:
        job, ctx = self.job, self.ctx
        n_effective = self.sink.left_out.n_effective()
        ones = torch.ones(job.n_val, dtype=ctx.compute_dtype)
        with ctx.progress(len(layers), f"{job.estimator} from disk", unit="layer") as bar:
            for number, layer in enumerate(layers):
                if number + 1 < len(layers):
                    store.prefetch(layers[number + 1])  # the disk reads the next layer while this one is scored
                names = self.pending(layer)
                for position in [p for p, ref in enumerate(refs) if ref.layer == layer]:
                    ref = refs[position]
                    val = store.factors("val", layer, position,
                                        MatrixFactors(job.n_val, ref.d_in, ref.d_out, ctx.compute_dtype))
                    v = ctx.dist.all_reduce_sum(val.weighted_sum(ones).to(ctx.device))
                    train = store.factors("train", layer, position, MatrixFactors(
                        job.n_train, ref.d_in, ref.d_out, ctx.compute_dtype, sq_norms=sq[position]))
                    each = _each_gradient(val) if job.pairwise else None
                    self.score_matrix(ref, MatrixInputs(train, v, each, n_effective), names)
                store.drop_layer(layer)
                self.finish_layer(layer, names)
                done.append(layer)
                bar.update(1)


class Stream(Strategy):
    """Weight-sized sums only: pass 1 (v, norms, g.v), pass 2 (u = sum c g), pass 3 (g.u); each pass saved."""

    def run(self, plan: PassPlan) -> int:
        job, ctx, sink = self.job, self.ctx, self.sink
        layers = plan.groups[0]
        refs = self.refs(layers)
        shapes = [(r.d_out, r.d_in) for r in refs]
        stream = StreamingInfluence(job.estimator, shapes, job.n_train, ctx)
        key = ("stream-" + "-".join(map(str, layers)) if len(layers) < 8
               else f"stream-{min(layers)}-{max(layers)}-{len(layers)}")
        saved = sink.load_unit(f"{key}-pass1")
        if saved is not None:
            stream.sq, stream.gv = saved["sq"].double(), saved["gv"].double()
        else:
            self.traverse("validation", refs, stream.consume_val, "validation gradients")
            stream.v = ctx.reduced_sums(stream.v, shapes)
            self.traverse("training", refs, stream.consume_first, f"pass 1/{stream.passes} (norms, g.v)")
            stream.sq, stream.gv = ctx.dist.all_reduce_sum(stream.sq), ctx.dist.all_reduce_sum(stream.gv)
            if job.estimator != "identity":
                sink.save_unit(f"{key}-pass1", {"sq": stream.sq, "gv": stream.gv})
        stream.n_effective = sink.left_out.n_effective() or job.n_train
        stream.v = [None] * len(refs)  # not needed after pass 1
        if job.estimator != "identity":
            stream.finish_first()
            saved = sink.load_unit(f"{key}-pass2")
            if saved is not None:
                stream.u = [saved[f"u.{i}"].to(ctx.device) for i in range(len(refs))]
            else:
                self.traverse("training", refs, stream.consume_second, f"pass 2/{stream.passes} (sum c g)")
                stream.u = ctx.reduced_sums(stream.u, shapes)
                sink.save_unit(f"{key}-pass2", {f"u.{i}": u for i, u in enumerate(stream.u)})
            self.traverse("training", refs, stream.consume_third, f"pass 3/{stream.passes} (g.u)")
            stream.gu = ctx.dist.all_reduce_sum(stream.gu)
        values = stream.influence()
        for position, ref in enumerate(refs):
            sink.put(ref, MatrixInfluence(values[position], None, float(stream.lam[position])))
        for layer in layers:
            sink.finish_layer(layer)
        return stream.passes


STRATEGY_TYPES: dict[str, type[Strategy]] = {"store": Store, "spill": Spill, "stream": Stream}


def compute_influences(job: ScoringJob, plan: PassPlan, ctx: RunContext,
                       checkpoint: Checkpoint | None = None) -> dict[str, InfluenceResult]:
    """Influence of each training sample through each selected matrix, per estimator of the job, following `plan`.

    Layers already saved in `checkpoint` are loaded instead of computed (the plan covers only the layers some
    estimator still lacks); each finished layer of each estimator, and each finished streaming pass, is saved
    to it. With `ctx.skip_nonfinite`, samples whose loss or gradient is not finite are left out of every sum
    (as if absent from the data) instead of stopping the run; the result lists them. Several estimators need
    the store or spill strategy (the streamed sums are DataInf's and identity's own).
    """
    if len(job.estimators) > 1 and plan.mode == "stream":
        raise LayerIFError("streaming passes score one estimator; use --strategy store or spill for several")
    left_out = LeftOut(job.n_train, ctx)
    sinks = {name: ResultSink(job, ctx, checkpoint, name, left_out) for name in job.estimators}
    planned = {layer for group in plan.groups for layer in group}
    for sink in sinks.values():
        sink.load_layers(planned)
    passes = STRATEGY_TYPES[plan.mode](job, ctx, sinks).run(plan)
    return {name: sink.result(passes) for name, sink in sinks.items()}


def compute_influence(job: ScoringJob, plan: PassPlan, ctx: RunContext,
                      checkpoint: Checkpoint | None = None) -> InfluenceResult:
    """`compute_influences` for a job with one estimator."""
    return next(iter(compute_influences(job, plan, ctx, checkpoint).values()))


def _each_gradient(factors: MatrixFactors) -> torch.Tensor:
    """Every sample's gradient of one matrix, in sample order: (n, d_out, d_in) (for the pairwise matrix)."""
    index, grads = next(factors.materialised(max_bytes=1 << 62))
    ordered = torch.empty_like(grads)
    ordered[index] = grads
    return ordered.view(factors.n, factors.d_out, factors.d_in)


def layer_unit(layer: int, estimator: str | None = None) -> str:
    """Checkpoint unit name of one finished layer (of one estimator, when a run has several)."""
    return f"layer-{layer:04d}" + (f".{estimator}" if estimator else "")
