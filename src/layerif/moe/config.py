"""Configuration of a LoRA-MoE adapter: experts per layer, expert shape, routing and target modules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from layerif.errors import LayerIFError


@dataclass
class MoEConfig:
    """What to inject: every selected projection of block l gets counts[l] LoRA experts and a router."""

    counts: list[int] = field(metadata={"help": "number of LoRA experts per layer (one entry per block)"})
    top_k: list[int] | int = field(
        default=2, metadata={"help": "experts used per token; an int k means min(k, n_l) in every layer"}
    )
    rank: int = field(default=8, metadata={"help": "rank r of every LoRA expert"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; expert outputs are scaled by alpha / rank"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the expert input (not on the router's)"})
    modules: str = field(default="all", metadata={"help": "attn | mlp | all: which projections of a block get experts"})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "optional names (e.g. q_proj, v_proj) to restrict the projections further"}
    )
    init: str = field(default="kaiming", metadata={"help": "init of the A matrices: kaiming (uniform) | gaussian"})
    load_balancing: float = field(
        default=0.0, metadata={"help": "coefficient of the Switch load-balancing loss (0 = off; 0.01 is typical)"}
    )

    def __post_init__(self) -> None:
        self.counts = [int(n) for n in self.counts]
        if not self.counts or min(self.counts) < 1:
            raise LayerIFError("every layer needs at least one expert")
        if isinstance(self.top_k, int):
            if self.top_k < 1:
                raise LayerIFError(f"top-k must be >= 1, got {self.top_k}")
            self.top_k = [min(self.top_k, n) for n in self.counts]
        self.top_k = [int(k) for k in self.top_k]
        if len(self.top_k) != len(self.counts):
            raise LayerIFError(f"top-k has {len(self.top_k)} entries for {len(self.counts)} layers")
        for layer, (k, n) in enumerate(zip(self.top_k, self.counts, strict=True)):
            if not 1 <= k <= n:
                raise LayerIFError(f"layer {layer}: top-k {k} must be between 1 and its number of experts ({n})")
        if self.rank < 1:
            raise LayerIFError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LayerIFError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("kaiming", "gaussian"):
            raise LayerIFError(f"init must be kaiming or gaussian, got {self.init!r}")
        if self.modules not in ("attn", "mlp", "all"):
            raise LayerIFError(f"modules must be attn, mlp or all, got {self.modules!r}")
        if self.load_balancing < 0:
            raise LayerIFError(f"load-balancing coefficient must be >= 0, got {self.load_balancing}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def n_layers(self) -> int:
        return len(self.counts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})
