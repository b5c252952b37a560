"""Perplexity on a text file over non-overlapping windows (the Wanda / SparseGPT protocol)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from layerif.errors import LayerIFError


def perplexity(
    model: nn.Module,
    tokenizer,
    source: str | Path,
    length: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
    quiet: bool = False,
) -> dict:
    """exp(mean next-token NLL) over the first `max_windows` non-overlapping windows of `length` tokens.

    The text is the file's lines joined by blank lines; every window is scored on its own (its first token
    has no context), as in the SparseGPT and Wanda evaluations. `window_nll` holds each window's summed NLL
    and `window_tokens` its scored tokens, the per-item results that paired statistics resample.
    """
    from layerif.calibration import default_length, read_text, tokenize_text

    length = length or default_length(model)
    if length < 2:
        raise LayerIFError(f"--ppl-length must be >= 2, got {length}")
    if max_windows is not None and max_windows < 1:
        raise LayerIFError(f"--ppl-windows must be >= 1, got {max_windows}")
    ids = tokenize_text(read_text(source), tokenizer)
    n_windows = len(ids) // length
    if n_windows == 0:
        raise LayerIFError(f"{source} has {len(ids)} tokens, fewer than one window of {length}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * length].view(n_windows, length)
    per_window = window_nll(model, windows, batch_size, quiet)
    n_tokens = n_windows * (length - 1)
    mean_nll = float(per_window.sum()) / n_tokens
    return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "windows": n_windows, "length": length,
            "tokens_scored": n_tokens, "source": str(source), "window_nll": per_window.tolist(),
            "window_tokens": [length - 1] * n_windows}


def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, quiet: bool = True) -> torch.Tensor:
    """Summed next-token NLL of each row of `windows` [n, length], each scored on its own -> float64 [n]."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    sums = []
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=quiet, unit="batch"):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            sums.append(nll.double().sum(dim=1).cpu())
    return torch.cat(sums)
