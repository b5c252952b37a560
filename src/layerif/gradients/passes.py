"""One batched forward+backward pass that hands each selected matrix's gradient factors to a consumer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from layerif.data.tokens import Batch, per_sample_loss
from layerif.errors import LayerIFError
from layerif.models.blocks import MatrixRef, find_blocks

# consumer(position of the matrix in `refs`, batch, x (B,T,d_in), delta (B,T,d_out), per-batch cache)
Consumer = Callable[[int, Batch, torch.Tensor, torch.Tensor, dict], None]


class NonFiniteGradient(LayerIFError):
    """A sample produced a NaN or infinite loss or gradient."""


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=quiet, dynamic_ncols=True, leave=False)


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


def _consume_without_bad_rows(state: dict, batch: Batch, consume: Consumer, skipped: dict[int, str]) -> None:
    """Hand a batch's held factors to the consumer with the rows of non-finite samples set to zero."""
    bad_rows = sorted(state["bad_rows"])
    keep = None
    if bad_rows:
        keep = torch.ones(len(batch.index), dtype=torch.bool)
        keep[bad_rows] = False
    for position, x, delta in state["pending"]:
        if keep is not None:
            mask = keep.to(x.device).view(-1, *([1] * (x.dim() - 1)))
            x, delta = torch.where(mask, x, torch.zeros_like(x)), torch.where(mask, delta, torch.zeros_like(delta))
        consume(position, batch, x, delta, state["cache"])
    state["pending"] = []
    for row in bad_rows:
        skipped.setdefault(int(batch.index[row]), state["bad_rows"][row])


def run_pass(
    model: nn.Module,
    batches: Sequence[Batch],
    refs: Sequence[MatrixRef],
    consume: Consumer,
    first_layer: int = 0,
    desc: str = "pass",
    quiet: bool = False,
    sample_names: Callable[[int], str] | None = None,
    skipped: dict[int, str] | None = None,
) -> None:
    """Forward+backward every batch once; backward stops at block `first_layer`'s input.

    Model weights are frozen for the pass, so autograd computes no weight gradients at all: the
    per-sample quantities are computed from the captured factors by `consume` instead.
    A sample whose loss or gradient is not finite raises NonFiniteGradient; with `skipped` given it is
    left out instead: its factors reach `consume` as zeros and skipped[sample] says where it went bad.
    (Then a batch's factors are held until its backward ends, since a bad gradient can appear late.)
    """
    _, blocks = find_blocks(model)
    device = next(model.parameters()).device
    saved_flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in saved_flags:
        param.requires_grad_(False)

    inputs: dict[int, torch.Tensor] = {}
    fired: set[int] = set()
    state: dict = {"batch": None, "cache": {}}
    handles = []

    def make_forward_hook(position: int):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            inputs[position] = args[0].detach()

            def grad_hook(grad):
                batch = state["batch"]
                delta = grad.detach()
                bad = ~torch.isfinite(delta).all(dim=tuple(range(1, delta.dim())))
                ref = refs[position]
                if skipped is not None:
                    # hooks fire from the top layer down: the first note is where the sample went bad
                    for row in bad.nonzero().flatten().tolist():
                        state["bad_rows"].setdefault(row, f"gradient in layer {ref.layer} ({ref.name})")
                    fired.add(position)
                    state["pending"].append((position, inputs.pop(position), delta))
                    return
                if bool(bad.any()):
                    sample = int(batch.index[bad.nonzero()[0, 0]])
                    name = sample_names(sample) if sample_names else f"sample {sample}"
                    raise NonFiniteGradient(f"non-finite gradient for {name} in layer {ref.layer} ({ref.name})")
                fired.add(position)
                consume(position, batch, inputs.pop(position), delta, state["cache"])

            output.register_hook(grad_hook)

        return hook

    def make_block_check(layer: int):
        def check(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            finite = torch.isfinite(hidden.detach()).flatten(1).all(dim=1)
            if not bool(finite.all()):
                first_bad = state["first_bad_layer"]
                newly = (~finite).cpu() & (first_bad < 0)
                first_bad[newly] = layer

        return check

    try:
        for position, ref in enumerate(refs):
            handles.append(ref.module.register_forward_hook(make_forward_hook(position)))
        handles.append(blocks[first_layer].register_forward_pre_hook(_start_graph, with_kwargs=True))
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_hook(make_block_check(layer)))
        with _progress(sum(len(batch.index) for batch in batches), desc, quiet) as bar:
            for batch in batches:
                on_device = batch.to(device)
                state["batch"], state["cache"] = batch, {}
                state["first_bad_layer"] = torch.full((len(batch.index),), -1)
                state["bad_rows"], state["pending"] = {}, []
                inputs.clear()
                fired.clear()
                with torch.enable_grad():
                    logits = model(
                        input_ids=on_device.input_ids, attention_mask=on_device.attention_mask, use_cache=False
                    ).logits
                    losses = per_sample_loss(logits, on_device.labels)
                    bad = ~torch.isfinite(losses)
                    if bool(bad.any()):
                        rows = bad.nonzero().flatten().tolist()
                        if skipped is None:
                            rows = rows[:1]
                        for row in rows:
                            sample = int(batch.index[row])
                            name = sample_names(sample) if sample_names else f"sample {sample}"
                            layer = int(state["first_bad_layer"][row])
                            where = f" (first non-finite activations at the output of layer {layer})" if layer >= 0 else ""
                            if skipped is None:
                                raise NonFiniteGradient(f"non-finite loss for {name}{where}")
                            state["bad_rows"][row] = f"loss{where}"
                        losses = torch.where(bad, torch.zeros_like(losses), losses)
                    del logits
                    losses.sum().backward()
                if skipped is not None:
                    _consume_without_bad_rows(state, batch, consume, skipped)
                for position in range(len(refs)):
                    if position not in fired:  # a matrix the loss does not reach: zero gradient
                        x = inputs.pop(position, None)
                        ref = refs[position]
                        if x is None:
                            shape = (*on_device.input_ids.shape, ref.d_in)
                            x = torch.zeros(shape, device=device, dtype=ref.module.weight.dtype)
                        delta = torch.zeros((*x.shape[:-1], ref.d_out), device=device, dtype=x.dtype)
                        consume(position, batch, x, delta, state["cache"])
                bar.update(len(batch.index))
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in saved_flags:
            param.requires_grad_(flag)
        inputs.clear()
