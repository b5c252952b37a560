"""The released-code style of computing LayerIF, used as the baseline in the speed benchmarks."""

from __future__ import annotations

import time

import torch


def batches_for(tokenizer, rows, batch_size, max_length=128):
    """Length-sorted batches as layerif makes them (rows may be dicts, strings or token-id lists)."""
    from layerif.api import _length_sorted_batches, _texts
    from layerif.data import encode_texts
    from layerif.data.tokens import EncodedSet

    if rows and isinstance(rows[0], torch.Tensor):
        encoded = EncodedSet(list(rows))
    else:
        encoded = encode_texts(_texts(rows, "bench"), tokenizer, max_length)
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    return _length_sorted_batches(encoded, batch_size, pad)


def paper_style_layer(model, tokenizer, train_rows, val_rows, layer: int) -> dict:
    """(b) for one layer: per-sample backward at batch size 1, then per-validation-sample DataInf loops."""
    from layerif.data.tokens import per_sample_loss
    from layerif.models import select_matrices

    refs = select_matrices(model, "all", "full")[layer]
    for param in model.parameters():
        param.requires_grad_(False)
    for ref in refs:
        ref.module.weight.requires_grad_(True)

    def gradients(rows):
        per_sample = [None] * len(rows)
        device = next(model.parameters()).device
        for batch in batches_for(tokenizer, rows, 1):
            index, batch = int(batch.index[0]), batch.to(device)
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            per_sample_loss(logits, batch.labels).sum().backward()
            grads = {ref.name: ref.module.weight.grad.detach().reshape(-1).float() for ref in refs}
            per_sample[index] = grads
        return per_sample

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    started = time.perf_counter()
    train_grads = gradients(train_rows)
    val_grads = gradients(val_rows)
    synchronize()
    grads_s = time.perf_counter() - started

    started = time.perf_counter()
    n = len(train_grads)
    lambdas = {name: 0.1 * sum(float((g[name] ** 2).mean()) for g in train_grads) / n for name in train_grads[0]}
    influence = torch.zeros(n, len(val_grads))
    for j, val_grad in enumerate(val_grads):  # the released code's loops: validation x train x matrices
        hvp = {}
        for name, lam in lambdas.items():
            h = torch.zeros_like(val_grad[name])
            for train_grad in train_grads:
                g = train_grad[name]
                c = torch.dot(val_grad[name], g) / (lam + torch.dot(g, g))
                h += (val_grad[name] - c * g) / (n * lam)
            hvp[name] = h
        for i, train_grad in enumerate(train_grads):
            influence[i, j] = -sum(float(torch.dot(hvp[name], train_grad[name])) for name in hvp)
    synchronize()
    datainf_s = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return {"layer": layer, "gradients_s": grads_s, "datainf_s": datainf_s, "q": (-influence.sum(1)).tolist()}


