"""LoRA-MoE wrapper around one projection: n LoRA experts, a bias-free router, softmax → top-k → renormalise."""

from __future__ import annotations

import math

import torch
from torch import nn

from layerif.errors import LayerIFError


class LoRAMoELinear(nn.Module):
    """h = W0 x + Σ_{j ∈ top-k} w_j B_j A_j dropout(x) · (alpha / rank), weights from softmax(W_r x).

    Expert weights are stacked (A: [n, r, d_in], B: [n, d_out, r], PEFT's per-expert layout) and all
    experts of the layer are evaluated with two matrix products; unselected experts get weight 0, so the
    result (and the gradient) equals evaluating only the top-k.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        d_in: int,
        d_out: int,
        n_experts: int,
        top_k: int,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise LayerIFError(f"a LoRA-MoE layer needs >= 1 expert, got {n_experts}")
        if not 1 <= top_k <= n_experts:
            raise LayerIFError(f"top-k {top_k} must be between 1 and the number of experts ({n_experts})")
        self.base_layer = base_layer
        self.d_in, self.d_out = d_in, d_out
        self.n_experts, self.top_k, self.rank = n_experts, top_k, rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = getattr(base_layer, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # adapters train in float32 on a half-precision base (as PEFT does)
        device = weight.device if weight is not None else None
        self.lora_A = nn.Parameter(torch.empty(n_experts, rank, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n_experts, d_out, rank, dtype=dtype, device=device))
        # A single expert always gets weight 1: a router would be a parameter without gradient.
        self.router = (
            nn.Parameter(torch.empty(n_experts, d_in, dtype=dtype, device=device)) if n_experts > 1 else None
        )
        self.init = init
        self.reset_parameters()
        self.aux_loss: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None  # [batch, seq] of real tokens, set by the training loop
        self.compute_aux = False

    def reset_parameters(self) -> None:
        """A: Kaiming-uniform (PEFT's default) or Gaussian std 1/r; B: zero; router: nn.Linear's default."""
        with torch.no_grad():
            flat_a = self.lora_A.view(self.n_experts * self.rank, self.d_in)
            if self.init == "gaussian":
                nn.init.normal_(flat_a, std=1.0 / self.rank)
            else:
                nn.init.kaiming_uniform_(flat_a, a=math.sqrt(5))
            self.lora_B.zero_()
            if self.router is not None:
                nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads `proj.weight` (dtype/device checks); expose the frozen base weight.
        return self.base_layer.weight

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] expert weights: softmax over the router logits, top-k kept and renormalised, rest 0."""
        if self.router is None:
            return x.new_ones(*x.shape[:-1], 1)
        probs = torch.softmax((x @ self.router.t()).float(), dim=-1)
        if self.top_k == self.n_experts:
            weights = probs
        else:
            top_values, top_index = probs.topk(self.top_k, dim=-1)
            top_values = top_values / top_values.sum(dim=-1, keepdim=True)
            weights = torch.zeros_like(probs).scatter(-1, top_index, top_values)
        if self.compute_aux and self.training:
            self.aux_loss = self._switch_loss(probs, weights)
        return weights.to(x.dtype)

    def _switch_loss(self, probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Switch Transformer balance loss n · Σ_e f_e P_e (f: share of routed slots, P: mean router prob)."""
        probs = probs.reshape(-1, self.n_experts)
        chosen = (weights.reshape(-1, self.n_experts) > 0).float()
        mask = self.token_mask
        if mask is not None and mask.numel() == probs.shape[0]:
            keep = mask.reshape(-1, 1).to(probs.dtype)
            count = keep.sum().clamp(min=1)
            share = (chosen * keep).sum(0) / (count * self.top_k)
            mean_prob = (probs * keep).sum(0) / count
        else:
            share = chosen.mean(0) / self.top_k
            mean_prob = probs.mean(0)
        return self.n_experts * (share.detach() * mean_prob).sum()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution Σ_j w_j B_j A_j dropout(x) · scaling."""
        x = x.to(self.lora_A.dtype)
        weights = self.routing_weights(x)  # [..., n]
        hidden = self.dropout(x) @ self.lora_A.reshape(self.n_experts * self.rank, self.d_in).t()  # [..., n*r]
        hidden = hidden.unflatten(-1, (self.n_experts, self.rank)) * (weights * self.scaling).unsqueeze(-1)
        expert_out = self.lora_B.transpose(1, 2).reshape(self.n_experts * self.rank, self.d_out)
        return hidden.flatten(-2) @ expert_out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        return out + self.delta(x).to(out.dtype)

    def n_trainable(self) -> int:
        """Adapter parameters of this projection: n·r·(d_in + d_out) plus the router's n·d_in when n > 1."""
        return sum(p.numel() for p in (self.lora_A, self.lora_B, self.router) if p is not None)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, experts={self.n_experts}, top_k={self.top_k}, rank={self.rank}"
