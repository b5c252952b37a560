"""LoRA parameter space: attach PEFT LoRA adapters to the selected block matrices, optionally fine-tune."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from layerif.data.tokens import Batch, LossFn, token_loss
from layerif.models.blocks import select_matrices


def attach_lora(model: nn.Module, modules: str, rank: int, alpha: int, seed: int) -> nn.Module:
    """Wrap `model` with PEFT LoRA on the same matrices the full space would score."""
    from peft import LoraConfig, get_peft_model

    names = sorted({ref.name.split(".")[-1] for refs in select_matrices(model, modules, "full") for ref in refs})
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.05, target_modules=names, bias="none",
                        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()))
    return get_peft_model(model, config)


def detach_lora(wrapped: nn.Module) -> nn.Module:
    """Remove the adapters again (without merging), returning the caller's base model to its own state."""
    return wrapped.unload()


@dataclass(frozen=True)
class Finetuning:
    """How long and how fast the LoRA weights are fine-tuned before scoring."""

    epochs: float
    lr: float
    seed: int = 0
    quiet: bool = False


def finetune_lora(
    wrapped: nn.Module, batches: Sequence[Batch], settings: Finetuning, loss_fn: LossFn = token_loss
) -> list[float]:
    """Brief AdamW fine-tuning of the LoRA weights on the training batches with the scoring loss; losses per step."""
    from tqdm.auto import tqdm

    epochs, lr, seed, quiet = settings.epochs, settings.lr, settings.seed, settings.quiet

    generator = torch.Generator().manual_seed(seed)
    device = next(wrapped.parameters()).device
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    steps = max(1, round(epochs * len(batches)))
    losses: list[float] = []
    wrapped.train()
    with tqdm(total=steps, desc="LoRA fine-tuning", disable=quiet, leave=False, dynamic_ncols=True) as bar:
        while len(losses) < steps:
            for position in torch.randperm(len(batches), generator=generator).tolist():
                if len(losses) >= steps:
                    break
                batch = batches[position].to(device)
                logits = wrapped(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                loss = loss_fn(logits, batch).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    wrapped.eval()
    return losses
