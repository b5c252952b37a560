"""Calibration text (random token windows) and a block-by-block forward runner that caches each block's inputs.

Shared by OWL's outlier ratios (allocation) and the Wanda / SparseGPT pruners: the model never sees the whole
calibration set at once; each block runs on the cached outputs of the block before it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerif.errors import LayerIFError

DEFAULT_SEQUENCES = 128
MAX_DEFAULT_LENGTH = 2048
ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
CACHE_ARGUMENTS = ("past_key_value", "past_key_values", "cache", "layer_past")


def model_context(model: nn.Module) -> int | None:
    """The model's context length from its config, when it records one."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_length(model: nn.Module) -> int:
    """min(2048, the model's context)."""
    context = model_context(model)
    return MAX_DEFAULT_LENGTH if context is None else min(MAX_DEFAULT_LENGTH, context)


def read_text(source: str | Path) -> str:
    """A text file's lines joined by blank lines, or the texts of a row file (JSONL/JSON/CSV) joined likewise."""
    path = Path(source)
    if not path.is_file():
        raise LayerIFError(f"text file not found: {source}")
    if path.suffix.lower() in ROW_SUFFIXES:
        from layerif.data import load_rows, row_text

        return "\n\n".join(row_text(row) for row in load_rows(path))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LayerIFError(f"{path}: not UTF-8 text") from exc
    return "\n\n".join(lines)


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """Token ids of a long text as one 1-D tensor (no length limit)."""
    limit = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e30)  # silence the "longer than the model" warning for a corpus
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    finally:
        if limit is not None:
            tokenizer.model_max_length = limit
    return ids


def calibration_ids(
    source: str | Path,
    tokenizer,
    n_sequences: int = DEFAULT_SEQUENCES,
    length: int = MAX_DEFAULT_LENGTH,
    seed: int = 0,
) -> torch.Tensor:
    """`n_sequences` random windows of `length` tokens from a text (seeded) -> [n_sequences, length]."""
    if n_sequences < 1:
        raise LayerIFError(f"--calib-sequences must be >= 1, got {n_sequences}")
    if length < 2:
        raise LayerIFError(f"--calib-length must be >= 2, got {length}")
    return sample_windows(tokenize_text(read_text(source), tokenizer), n_sequences, length, seed, str(source))


def sample_windows(ids: torch.Tensor, n_sequences: int, length: int, seed: int = 0,
                   source: str = "the calibration text") -> torch.Tensor:
    """`n_sequences` windows of `length` tokens at seeded random starts in 1-D `ids` -> [n_sequences, length]."""
    if len(ids) <= length:
        raise LayerIFError(f"calibration text {source} has {len(ids)} tokens, fewer than one sequence of {length}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - length, size=n_sequences)
    return ids[torch.as_tensor(starts)[:, None] + torch.arange(length)[None, :]]


class _Captured(Exception):
    """Raised by the pre-hook of the first block once its inputs are caught."""


def _first_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class BlockRunner:
    """Runs calibration sequences through the blocks one at a time, keeping only the current activations."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8):
        from layerif.models import find_blocks

        if input_ids.dim() != 2:
            raise LayerIFError("calibration ids must be a [sequences, length] tensor")
        if batch_size < 1:
            raise LayerIFError(f"--batch-size must be >= 1, got {batch_size}")
        self.model = model
        _, self.blocks = find_blocks(model)
        device = next(model.parameters()).device
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict[int, dict] = {}  # keyword arguments of a block call, per batch size
        first = self.blocks[0]

        signature = inspect.signature(first.forward)
        first_name = next(iter(signature.parameters))

        def catch(_module, args, kwargs):
            # Bind positional arguments to their names (GPT-2 passes the mask positionally) so each block
            # can be called again as block(hidden, **rest).
            bound = signature.bind_partial(*args, **kwargs).arguments
            rest = {}
            for name, value in bound.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    rest.update(value)
                elif name != first_name:
                    rest[name] = value
            hidden = bound[first_name]
            for name in CACHE_ARGUMENTS:
                if name in rest:
                    rest[name] = None
            if "use_cache" in signature.parameters or any(
                    p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
                rest["use_cache"] = False
            self.hidden.append(hidden.detach())
            self.kwargs.setdefault(hidden.shape[0], rest)
            raise _Captured

        handle = first.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in input_ids.split(batch_size):
                    try:
                        model(input_ids=batch.to(device), use_cache=False)
                    except _Captured:
                        pass
        finally:
            handle.remove()

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, block: nn.Module) -> list[torch.Tensor]:
        """Outputs of `block` on the cached inputs (which stay unchanged)."""
        with torch.no_grad():
            return [_first_output(block(hidden, **self.kwargs[hidden.shape[0]])).detach() for hidden in self.hidden]

    def advance(self, block: nn.Module) -> None:
        """Replace the cached inputs by `block`'s outputs (the inputs of the next block)."""
        self.hidden = self.forward(block)


@contextmanager
def input_hooks(modules: dict[str, nn.Module], collect: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call collect(name, x) with the 2-D input rows [tokens, d_in] of each module during forwards."""

    def make(name: str):
        def hook(_module, args, _output):
            x = args[0].detach()
            collect(name, x.reshape(-1, x.shape[-1]))

        return hook

    handles = [module.register_forward_hook(make(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class InputStats:
    """Running per-module statistics of the inputs: Σx² per feature (Wanda, OWL) and optionally XᵀX (SparseGPT)."""

    def __init__(self, gram: bool = False):
        self.gram = gram
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.float()
        if name not in self.sq_sum:
            self.sq_sum[name] = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
            self.tokens[name] = 0
            if self.gram:
                self.xtx[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        self.sq_sum[name] += (x * x).sum(dim=0)
        self.tokens[name] += x.shape[0]
        if self.gram:
            self.xtx[name] += x.t() @ x

    def mean_sq(self, name: str) -> torch.Tensor:
        """Per-feature mean of x² (Wanda's ‖X_j‖₂² up to a constant that does not change any ranking)."""
        return self.sq_sum[name] / max(self.tokens[name], 1)

    def hessian(self, name: str) -> torch.Tensor:
        """SparseGPT's H = 2 XᵀX / tokens."""
        return 2 * self.xtx[name] / max(self.tokens[name], 1)


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance |W_ij| · ‖X_j‖₂ for W in (d_out, d_in) and the per-input-feature squared norm of X."""
    return weight.detach().abs().float() * input_sq_norm.float().clamp(min=0).sqrt().unsqueeze(0)


def check_calibration_arguments(calib: str | None, sequences: int, length: int | None) -> None:
    """Refuse a missing calibration file or impossible calibration sizes, before anything is loaded."""
    from pathlib import Path

    from layerif.errors import LayerIFError

    if calib is not None and not Path(calib).is_file():
        raise LayerIFError(f"calibration file not found: {calib}")
    if sequences < 1:
        raise LayerIFError(f"--calib-sequences must be >= 1, got {sequences}")
    if length is not None and length < 2:
        raise LayerIFError(f"--calib-length must be >= 2, got {length}")
