"""`layerif moe train` as a job object, and the train-and-save step the benchmark shares with it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from layerif.allocate.experts import ExpertAllocation
from layerif.errors import LayerIFError
from layerif.io import atomic_write_json
from layerif.moe.config import MoEConfig
from layerif.moe.inject import ADAPTER_CONFIG, ADAPTER_WEIGHTS, expected_parameters, inject_moe, save_adapter
from layerif.moe.train import TrainConfig, train_moe
from layerif.outdir import OutputFolder

OUTPUTS = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "experts.json", "train.json")


def train_adapter(
    loaded,
    rows: list[dict],
    allocation: ExpertAllocation,
    out: str | Path,
    moe_options: dict | None = None,
    train_config: TrainConfig | None = None,
    model_name: str | None = None,
    quiet: bool = False,
    extra: dict | None = None,
) -> dict:
    """Inject a LoRA-MoE with `allocation` into a LoadedModel, train it on rows, save adapter + logs to `out`."""
    train_config = train_config or TrainConfig()
    moe_options = dict(moe_options or {})
    if "load_balancing" not in moe_options and train_config.load_balancing is not None:
        moe_options["load_balancing"] = train_config.load_balancing
    config = MoEConfig(counts=allocation.counts, top_k=allocation.top_k, **moe_options)
    inject_moe(loaded.model, config, seed=train_config.seed)
    n_trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    if n_trainable != expected_parameters(loaded.model, config):  # a seam check, cheap
        raise RuntimeError("trainable parameters do not match the allocation")
    log = train_moe(loaded.model, loaded.tokenizer, rows, train_config, quiet=quiet)
    out = Path(out)
    info = {"model": model_name or loaded.source, "allocation": allocation.to_dict(), **(extra or {})}
    save_adapter(loaded.model, out, base_model=loaded.source, extra=info)
    allocation.save(out)
    log["trainable_parameters"] = n_trainable
    atomic_write_json(out / "train.json", log)
    return log


@dataclass
class MoETrainJob:
    """Everything `layerif moe train` needs."""

    model: str
    train: str
    out: str
    split: str | None = None
    allocation: str = "layerif"
    scores: str | None = None
    budget: int | None = None
    beta: float = 2.5
    score: str = "S_pos"
    top_k: int | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    modules: str = "all"
    load_balancing: float = 0.0
    epochs: float = 3.0
    lr: float = 3e-4
    batch_size: int = 16
    micro_batch_size: int | None = None
    max_memory: str | None = None
    warmup: float | None = None
    cutoff: int = 256
    train_on_inputs: bool = True
    n_train: int | None = None
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    quiet: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False  # run code shipped in a model folder (--trust-remote-code)

    def train_config(self) -> TrainConfig:
        """The training settings (checked)."""
        warmup = None if self.warmup is None else (int(self.warmup) if self.warmup >= 1 else self.warmup)
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           micro_batch_size=self.micro_batch_size, max_memory=self.max_memory, warmup=warmup,
                           cutoff=self.cutoff,
                           train_on_inputs=self.train_on_inputs, seed=self.seed)

    def validate(self) -> OutputFolder:
        """Check every argument that can be checked before loading the model; the checked --out folder."""
        from layerif.allocate.jobs import check_aggregation, check_model_argument, check_scores_folder
        from layerif.data.loading import check_source
        from layerif.models.load import check_device, resolve_dtype

        for flag, value in (("--epochs", self.epochs), ("--lr", self.lr), ("--alpha", self.alpha),
                            ("--beta", self.beta)):
            if not (math.isfinite(value) and value > 0):
                raise LayerIFError(f"{flag} must be a finite number > 0, got {value}")
        if self.warmup is not None and not (math.isfinite(self.warmup) and self.warmup >= 0):
            raise LayerIFError(f"--warmup must be a finite number >= 0, got {self.warmup}")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise LayerIFError(f"--dropout must be inside [0, 1), got {self.dropout}")
        if not (math.isfinite(self.load_balancing) and self.load_balancing >= 0):
            raise LayerIFError(f"--load-balancing must be a finite number >= 0, got {self.load_balancing}")
        if self.rank < 1:
            raise LayerIFError(f"--rank must be >= 1, got {self.rank}")
        if self.n_train is not None and self.n_train < 1:
            raise LayerIFError(f"--n-train must be >= 1, got {self.n_train}")
        if self.seed < 0:
            raise LayerIFError(f"--seed must be >= 0, got {self.seed}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise LayerIFError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.max_memory is not None:
            from layerif.sizes import parse_bytes

            parse_bytes(self.max_memory)
        MoEConfig(counts=[1], top_k=[1], rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                  modules=self.modules, load_balancing=self.load_balancing)  # its own checks (modules, ...)
        self.train_config()
        check_aggregation(self.score)
        check_source(self.train, self.split)
        check_scores_folder(self.scores)
        resolve_dtype(self.dtype)
        check_device(self.device)
        check_model_argument(self.model, self.trust_remote_code)
        folder = OutputFolder(self.out, "moe train", overwrite=self.overwrite, inputs=[self.model], names=OUTPUTS)
        folder.check()
        return folder

    def run(self) -> tuple[dict, ExpertAllocation, int]:
        """Allocate, train and publish the adapter -> (training log, allocation, number of layers)."""
        from layerif.allocate.jobs import expert_allocation
        from layerif.data import load_rows, select_rows
        from layerif.models import find_blocks, load_model

        folder = self.validate()
        train_config = self.train_config()
        rows = select_rows(load_rows(self.train, self.split, self.quiet), self.n_train, what="training rows")
        with folder:
            loaded = load_model(self.model, dtype=self.dtype, device=self.device, quiet=self.quiet,
                                trust_remote_code=self.trust_remote_code)
            n_layers = len(find_blocks(loaded.model)[1])
            allocation = expert_allocation(self.allocation, self.budget, self.beta, self.top_k,
                                           scores_dir=self.scores, score=self.score, n_layers=n_layers,
                                           model=loaded.model, seed=self.seed)
            moe_options = {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                           "modules": self.modules, "load_balancing": self.load_balancing}
            log = train_adapter(loaded, rows, allocation, folder.staging, moe_options, train_config,
                                model_name=self.model, quiet=self.quiet,
                                extra={"train": self.train, "n_train": len(rows)})
            folder.publish()
        return log, allocation, n_layers
