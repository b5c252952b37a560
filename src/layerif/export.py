"""Carry an allocation into other tools: a PEFT LoraConfig with LayerIF ranks, and per-module sparsity maps."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerif.errors import LayerIFError
from layerif.io import atomic_write_text
from layerif.scores import AGGREGATIONS, LayerScores

SPARSITY_FORMATS = ("yaml", "json", "csv")


def base_module_names(module_names: list[str]) -> list[str]:
    """Block-relative names of the matrices that were scored (LoRA-space parts map back to their base module)."""
    names: list[str] = []
    for name in module_names:
        base = name.split(".lora_")[0]
        if base not in names:
            names.append(base)
    return names


def rank_key(layer: int, module: str, blocks_path: str | None = None) -> str:
    """A rank_pattern key selecting exactly one module of one block.

    PEFT matches a key k against a module's full name with `(.*\\.)?k$`, so `3.self_attn.q_proj` can only match
    at a dot boundary, i.e. block 3's module in a numbered block list, whatever the list is called.
    """
    return f"{blocks_path}.{layer}.{module}" if blocks_path else f"{layer}.{module}"


def recorded_blocks_path(run_dir: str | Path) -> str | None:
    """The block list's attribute path if the run recorded one in run.json (`model.blocks_path`), else None."""
    try:
        record = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = (record.get("model") or {}).get("blocks_path") if isinstance(record, dict) else None
    return path if isinstance(path, str) and path else None


def lora_ranks(scores: LayerScores, total_rank: int, beta: float = 2.5, score: str = "S_pos") -> np.ndarray:
    """Per-block LoRA rank: the DESIGN §4 expert rule applied to rank units (>= 1 per block, summing to R)."""
    from layerif.allocate.experts import layerif_counts

    if score not in AGGREGATIONS:
        raise LayerIFError(f"unknown score {score!r}; choose from {', '.join(AGGREGATIONS)}")
    if int(total_rank) != total_rank or total_rank < scores.n_layers:
        raise LayerIFError(f"--total-rank must be an integer >= the number of blocks ({scores.n_layers}) so every "
                           f"block gets rank >= 1; got {total_rank}")
    return layerif_counts(scores.scores(score), int(total_rank), beta)


def peft_lora_config(scores: LayerScores, total_rank: int, beta: float = 2.5, score: str = "S_pos",
                     alpha_ratio: float = 2.0, dropout: float = 0.05, blocks_path: str | None = None) -> dict:
    """Keyword arguments of `peft.LoraConfig` giving block l's scored matrices rank r_l and alpha alpha_ratio·r_l."""
    if not np.isfinite(alpha_ratio) or alpha_ratio <= 0:
        raise LayerIFError(f"--alpha-ratio must be > 0, got {alpha_ratio}")
    if not 0 <= dropout < 1:
        raise LayerIFError(f"--dropout must be inside [0, 1), got {dropout}")
    ranks = lora_ranks(scores, total_rank, beta, score)
    modules = base_module_names(scores.module_names)
    rank_pattern = {rank_key(layer, module, blocks_path): int(rank)
                    for layer, rank in enumerate(ranks) for module in modules}
    alpha_pattern = {key: float(alpha_ratio * rank) for key, rank in rank_pattern.items()}
    default_rank = max(1, int(round(total_rank / scores.n_layers)))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": default_rank,
        "lora_alpha": float(alpha_ratio * default_rank),
        "lora_dropout": float(dropout),
        "bias": "none",
        "target_modules": modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def lora_parameter_count(ranks, matrix_shapes: list[list[tuple[int, int]]]) -> int:
    """Trainable LoRA parameters: Σ_l r_l · Σ_{W in block l} (d_in + d_out)."""
    return int(sum(int(rank) * sum(d_in + d_out for d_in, d_out in shapes)
                   for rank, shapes in zip(ranks, matrix_shapes, strict=True)))


def _layer_of(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def sparsity_map(ratios_path: str | Path, blocks_path: str | None = None) -> dict:
    """Per-module sparsity mapping and the ordered per-block list of a ratios.json.

    Ratios made from scores alone name matrices `blocks.<l>.<module>`; `blocks_path` (e.g. `model.layers`) renames
    that prefix to the model's own.
    """
    from layerif.allocate.sparsity import SparsityAllocation

    try:
        plan = SparsityAllocation.load(ratios_path)
    except (KeyError, TypeError, ValueError) as exc:
        raise LayerIFError(f"{ratios_path}: not a complete ratios.json ({exc})") from exc
    modules = {}
    for name, ratio in plan.matrix_ratios.items():
        if blocks_path and name.startswith("blocks."):
            name = f"{blocks_path}.{name[len('blocks.'):]}"
        modules[name] = float(ratio)
    for name, ratio in modules.items():
        layer = _layer_of(name)
        if layer is None or layer >= len(plan.block_ratios) or abs(plan.block_ratios[layer] - ratio) > 1e-12:
            raise LayerIFError(f"{ratios_path}: matrix {name} does not match the per-block ratios")
    return {
        "allocation": plan.allocation,
        "target_sparsity": float(plan.target),
        "mean_sparsity": float(plan.mean_sparsity),
        "layer_sparsity": [float(r) for r in plan.block_ratios],
        "module_sparsity": modules,
    }


def format_sparsity(mapping: dict, fmt: str) -> str:
    """Render a sparsity map as YAML, JSON, or CSV (one row per module: module, layer, sparsity)."""
    if fmt == "json":
        return json.dumps(mapping, indent=2) + "\n"
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(mapping, sort_keys=False, default_flow_style=None, width=120)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["module", "layer", "sparsity"])
        for name, ratio in mapping["module_sparsity"].items():
            writer.writerow([name, _layer_of(name), repr(ratio)])
        return buffer.getvalue()
    raise LayerIFError(f"--format must be one of {', '.join(SPARSITY_FORMATS)}, got {fmt!r}")


def write_peft_config(config: dict, out: str | Path) -> Path:
    """Write the LoraConfig keyword arguments as JSON, atomically."""
    return atomic_write_text(out, json.dumps(config, indent=2) + "\n")


def write_sparsity(ratios_path: str | Path, fmt: str, out: str | Path, blocks_path: str | None = None) -> Path:
    """Export a ratios.json as a per-module sparsity file in `fmt`, atomically."""
    if fmt not in SPARSITY_FORMATS:
        raise LayerIFError(f"--format must be one of {', '.join(SPARSITY_FORMATS)}, got {fmt!r}")
    return atomic_write_text(out, format_sparsity(sparsity_map(ratios_path, blocks_path), fmt))


def _refuse_existing(out: str, overwrite: bool) -> None:
    if Path(out).is_dir():
        raise LayerIFError(f"--out {out} is a directory; give a file name")
    if Path(out).exists() and not overwrite:
        raise LayerIFError(f"--out {out} already exists; pass --overwrite to replace it")


@dataclass
class PeftExportJob:
    """Everything `layerif export peft` needs."""

    scores: str
    total_rank: int
    out: str
    beta: float = 2.5
    score: str = "S_pos"
    alpha_ratio: float = 2.0
    dropout: float = 0.05
    blocks_path: str | None = None
    overwrite: bool = False

    def run(self) -> tuple[np.ndarray, Path]:
        """Write the LoraConfig JSON; the per-block ranks and the path written."""
        _refuse_existing(self.out, self.overwrite)
        loaded = LayerScores.load(self.scores)
        blocks_path = self.blocks_path or recorded_blocks_path(self.scores)
        config = peft_lora_config(loaded, self.total_rank, self.beta, self.score, self.alpha_ratio, self.dropout,
                                  blocks_path)
        return lora_ranks(loaded, self.total_rank, self.beta, self.score), write_peft_config(config, self.out)


@dataclass
class SparsityExportJob:
    """Everything `layerif export sparsity` needs."""

    ratios: str
    out: str
    fmt: str = "yaml"
    blocks_path: str | None = None
    overwrite: bool = False

    def run(self) -> Path:
        """Write the per-module sparsity file; the path written."""
        _refuse_existing(self.out, self.overwrite)
        return write_sparsity(self.ratios, self.fmt, self.out, self.blocks_path)
