"""One batched forward+backward pass that hands each selected matrix's gradient factors to a consumer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from layerif.data.tokens import Batch, per_sample_loss
from layerif.errors import LayerIFError
from layerif.gradients.context import RunContext
from layerif.models.blocks import MatrixRef, find_blocks

# consumer(position of the matrix in `refs`, batch, x (B,T,d_in), delta (B,T,d_out), per-batch cache)
Consumer = Callable[[int, Batch, torch.Tensor, torch.Tensor, dict], None]


class NonFiniteGradient(LayerIFError):
    """A sample produced a NaN or infinite loss or gradient."""


def _start_graph(module, args, kwargs):
    """Forward pre-hook: the block's input becomes a leaf that requires grad, so the backward stops there.

    Blocks before it see no tensor that requires grad (weights are frozen), so they build no graph.
    """
    if args:
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
    return args, kwargs


# Backward temporaries on top of the saved activations; calibrated on SmolLM2-135M (CPU, batch 8 x 128):
# the estimate gives 1.84 GiB against a measured 1.93 GiB peak increase of a forward+backward.
_BACKWARD_OVERHEAD = 1.25


def measure_pass(model: nn.Module, batch: Batch) -> tuple[int, float]:
    """(bytes a forward+backward of `batch` needs beyond the model's weights, seconds of its forward).

    A forward with the graph starting at block 0 (the longest backward) counts the tensors autograd saves
    (the model's own weights excluded), times an overhead for backward temporaries, plus three
    logits-sized float32 buffers (logits, log-probabilities, their gradient). No backward is run.
    """
    import time

    _, blocks = find_blocks(model)
    device = next(model.parameters()).device
    weights = {param.untyped_storage().data_ptr() for param in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    handle = blocks[0].register_forward_pre_hook(_start_graph, with_kwargs=True)
    on_device = batch.to(device)
    try:
        with torch.no_grad():  # warm-up: the first forward after loading pays one-off costs
            model(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask, use_cache=False)
        started = time.perf_counter()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logits = model(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask,
                           use_cache=False).logits
            per_sample_loss(logits, on_device.labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        logits_bytes = logits.numel() * 4
    finally:
        handle.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
    return int(sum(saved.values()) * _BACKWARD_OVERHEAD + 3 * logits_bytes), seconds


@dataclass(frozen=True)
class PassSpec:
    """One traversal of a sample set: its progress label, whose samples, and where the backward stops."""

    desc: str
    what: str = "training"  # names samples in messages: "training sample 3"
    first_layer: int = 0  # the backward stops at this block's input
    skipped: dict[int, str] | None = None  # with the skip policy: left-out sample -> where it went non-finite


class _BatchWatch:
    """The hooks of one pass and the state of the batch in flight.

    Non-finite checks stay on the device (a `torch.where` per block and per matrix) and are read back once
    per batch, after its backward: one host sync per batch, not per matrix.
    """

    def __init__(self, refs: Sequence[MatrixRef], consume: Consumer, spec: PassSpec):
        self.refs, self.consume, self.spec = refs, consume, spec
        self.holding = spec.skipped is not None  # skip policy: hold factors until the batch is known clean

    def start(self, batch: Batch, device: torch.device) -> None:
        """Reset the per-batch state before `batch`'s forward."""
        self.batch, self.cache = batch, {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.fired: list[int] = []  # matrix positions in the order their gradients arrived (top layer first)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        rows = len(batch.index)
        self.first_bad_block = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.first_bad_gradient = torch.full((rows,), -1, dtype=torch.long, device=device)

    def on_forward(self, position: int, module, args, output) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        self.inputs[position] = args[0].detach()
        output.register_hook(partial(self.on_gradient, position))

    def on_gradient(self, position: int, grad: torch.Tensor) -> None:
        delta = grad.detach()
        bad = ~torch.isfinite(delta).flatten(1).all(dim=1)
        order = len(self.fired)
        self.fired.append(position)
        self.first_bad_gradient = torch.where(bad & (self.first_bad_gradient < 0), order, self.first_bad_gradient)
        x = self.inputs.pop(position)
        if self.holding:
            self.pending.append((position, x, delta))
        else:  # consumed during the backward; a non-finite batch raises at its end
            self.consume(position, self.batch, x, delta, self.cache)

    def on_block(self, layer: int, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        bad = ~torch.isfinite(hidden.detach()).flatten(1).all(dim=1)
        self.first_bad_block = torch.where(bad & (self.first_bad_block < 0), layer, self.first_bad_block)

    def _name(self, row: int) -> str:
        return f"{self.spec.what} sample {int(self.batch.index[row])}"

    def finish(self, loss_bad: torch.Tensor, device: torch.device) -> None:
        """After the backward: one sync for every check, then left-out rows, then zeros for unreached matrices."""
        flags = torch.stack([loss_bad.long(), self.first_bad_block, self.first_bad_gradient]).cpu()
        reasons: dict[int, str] = {}
        for row in flags[0].nonzero().flatten().tolist():
            block = int(flags[1, row])
            where = f" (first non-finite activations at the output of layer {block})" if block >= 0 else ""
            if not self.holding:
                raise NonFiniteGradient(f"non-finite loss for {self._name(row)}{where}")
            reasons[row] = f"loss{where}"
        bad_gradient = flags[2]
        if not self.holding and bool((bad_gradient >= 0).any()):
            first = int(bad_gradient[bad_gradient >= 0].min())
            row = int((bad_gradient == first).nonzero()[0, 0])
            ref = self.refs[self.fired[first]]
            raise NonFiniteGradient(f"non-finite gradient for {self._name(row)} in layer {ref.layer} ({ref.name})")
        for row in (bad_gradient >= 0).nonzero().flatten().tolist():
            ref = self.refs[self.fired[int(bad_gradient[row])]]
            reasons.setdefault(row, f"gradient in layer {ref.layer} ({ref.name})")
        self._release(reasons)
        fired = set(self.fired)
        for position, ref in enumerate(self.refs):
            if position not in fired:  # a matrix the loss does not reach: zero gradient
                x = self.inputs.pop(position, None)
                if x is None:
                    x = torch.zeros((*self.batch.input_ids.shape, ref.d_in), device=device, dtype=ref.module.weight.dtype)
                delta = torch.zeros((*x.shape[:-1], ref.d_out), device=device, dtype=x.dtype)
                self.consume(position, self.batch, x, delta, self.cache)

    def _release(self, reasons: dict[int, str]) -> None:
        """Hand held factors to the consumer, rows of left-out samples set to zero."""
        keep = None
        if reasons:
            keep = torch.ones(len(self.batch.index), dtype=torch.bool)
            keep[sorted(reasons)] = False
        for position, x, delta in self.pending:
            if keep is not None:
                mask = keep.to(x.device).view(-1, *([1] * (x.dim() - 1)))
                x, delta = torch.where(mask, x, torch.zeros_like(x)), torch.where(mask, delta, torch.zeros_like(delta))
            self.consume(position, self.batch, x, delta, self.cache)
        self.pending = []
        for row, reason in sorted(reasons.items()):
            self.spec.skipped.setdefault(int(self.batch.index[row]), reason)


def run_pass(
    model: nn.Module, batches: Sequence[Batch], refs: Sequence[MatrixRef], consume: Consumer, ctx: RunContext,
    spec: PassSpec,
) -> None:
    """Forward+backward every batch once, handing each matrix's factors to `consume`.

    Model weights are frozen for the pass, so autograd computes no weight gradients at all: the
    per-sample quantities are computed from the captured factors by `consume` instead. The loss is
    `ctx.loss`. A sample whose loss or gradient is not finite raises NonFiniteGradient; with
    `spec.skipped` given it is left out instead: its factors reach `consume` as zeros and
    skipped[sample] says where it went bad (then a batch's factors are held until its backward ends,
    since a bad gradient can appear late).
    """
    _, blocks = find_blocks(model)
    saved_flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in saved_flags:
        param.requires_grad_(False)
    watch = _BatchWatch(refs, consume, spec)
    handles = [ref.module.register_forward_hook(partial(watch.on_forward, position))
               for position, ref in enumerate(refs)]
    handles.append(blocks[spec.first_layer].register_forward_pre_hook(_start_graph, with_kwargs=True))
    handles.extend(block.register_forward_hook(partial(watch.on_block, layer)) for layer, block in enumerate(blocks))
    try:
        with ctx.progress(sum(len(batch.index) for batch in batches), spec.desc) as bar:
            for batch in batches:
                on_device = batch.to(ctx.device)
                watch.start(batch, ctx.device)
                with torch.enable_grad():
                    logits = model(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask,
                                   use_cache=False).logits
                    losses = ctx.loss(logits, on_device)
                    del logits
                    loss_bad = ~torch.isfinite(losses)
                    torch.where(loss_bad, torch.zeros_like(losses), losses).sum().backward()
                watch.finish(loss_bad, ctx.device)
                bar.update(len(batch.index))
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in saved_flags:
            param.requires_grad_(flag)
