"""Fine-tune the LoRA-MoE parameters of a model: AdamW, linear warm-up then decay, gradient accumulation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from layerif.data import row_text
from layerif.errors import LayerIFError
from layerif.moe.inject import aux_loss, moe_layers, set_token_mask


@dataclass
class TrainConfig:
    """Training settings; the defaults are the paper's (3 epochs, lr 3e-4, AdamW, cutoff 256, warm-up 100)."""

    epochs: float = field(default=3.0, metadata={"help": "passes over the training rows (fractions allowed)"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs when given"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=16, metadata={"help": "effective batch (micro-batch × accumulation)"})
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "rows per forward pass; None: the largest divisor of batch_size that fits max_memory"},
    )
    max_memory: int | str | None = field(
        default=None, metadata={"help": "activation memory budget of one micro-batch (e.g. 4GiB); None: half the free memory"}
    )
    warmup: int | float | None = field(
        default=None, metadata={"help": "warm-up steps (int) or fraction of steps (float); None: min(100, 10 %)"}
    )
    cutoff: int = field(default=256, metadata={"help": "maximum tokens per training text"})
    train_on_inputs: bool = field(default=True, metadata={"help": "loss on the whole text, or on the output only"})
    seed: int = field(default=0, metadata={"help": "seed for init order, shuffling and dropout"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    load_balancing: float | None = field(
        default=None, metadata={"help": "override the adapter's load-balancing coefficient"}
    )

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise LayerIFError(f"--epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise LayerIFError(f"--steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise LayerIFError(f"--lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise LayerIFError("batch sizes must be >= 1")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise LayerIFError(
                f"--batch-size ({self.batch_size}) must be a multiple of --micro-batch-size ({self.micro_batch_size})"
            )
        if self.cutoff < 2:
            raise LayerIFError(f"--cutoff must be >= 2, got {self.cutoff}")


# Backward holds, besides the saved activations, gradient buffers of about their size (the logits' gradient
# above all) and the allocator fragments: budget twice the measured saved bytes.
BACKWARD_FACTOR = 2.0


def activation_bytes_per_token(model: nn.Module, item: dict, pad_id: int) -> float:
    """Bytes the autograd graph keeps per token of a training forward, measured on one row (`item`).

    Counts every tensor saved for backward (once per storage), leaving out the parameters, which exist anyway.
    Random state is restored afterwards, so the probe does not change training.
    """
    device = next(model.parameters()).device
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = {key: value.to(device) for key, value in _collate([item], pad_id).items()}
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            set_token_mask(model, batch["attention_mask"].bool())
            loss = token_loss(model, batch)
            del loss
    finally:
        set_token_mask(model, None)
        model.train(was_training)
    return sum(saved.values()) / batch["input_ids"].numel()


def separable_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(body, head) when the logits are exactly head(body(...) hidden states); None for any other model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or body is None or body is model:
        return None
    config = getattr(model, "config", None)
    # models that soft-cap or scale their logits after the head: the full forward is the only exact one
    if getattr(config, "final_logit_softcapping", None) or any(
            getattr(config, name, 1.0) not in (None, 1.0) for name in ("logit_scale", "logits_scaling")):
        return None
    return body, head


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor], full_head: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions of a batch.

    The LM head runs only at the labelled positions (with the answer-only loss, a few per row instead of every
    position of the vocabulary-wide head); `full_head`, or a model whose head cannot be split off, computes the
    logits everywhere as the model's own forward does. Both give the same loss and gradients.
    """
    targets = batch["labels"][:, 1:]
    split = None if full_head else separable_head(model)
    if split is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(_at_least_float32(logits[:, :-1]).reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1), ignore_index=-100, reduction="sum")
    body, head = split
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    keep = targets != -100
    logits = head(hidden[:, :-1][keep])
    return nn.functional.cross_entropy(_at_least_float32(logits), targets[keep], reduction="sum")


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def memory_budget(max_memory: int | str | None) -> int:
    """Activation budget in bytes: the given size, or half of the memory available now."""
    if max_memory is not None:
        from layerif.sizes import parse_bytes

        return int(parse_bytes(max_memory))
    import psutil

    return int(psutil.virtual_memory().available // 2)


def fit_micro_batch(batch_size: int, bytes_per_row: float, budget: float) -> int:
    """The largest divisor of `batch_size` whose rows fit `budget` (at least 1: a row is the smallest unit)."""
    fitting = [d for d in range(1, batch_size + 1) if batch_size % d == 0 and d * bytes_per_row <= budget]
    return max(fitting, default=1)


def plan_micro_batch(model: nn.Module, items: list[dict], config: TrainConfig, pad_id: int) -> tuple[int, dict]:
    """Micro-batch size for training: the configured one, or the largest that fits the memory budget."""
    if config.micro_batch_size is not None:
        return config.micro_batch_size, {"micro_batch_size": config.micro_batch_size, "chosen": "given"}
    longest = max(items, key=lambda item: len(item["input_ids"]))
    per_token = activation_bytes_per_token(model, longest, pad_id)
    per_row = BACKWARD_FACTOR * per_token * len(longest["input_ids"])  # rows are padded to the longest
    budget = memory_budget(config.max_memory)
    micro = fit_micro_batch(config.batch_size, per_row, budget)
    return micro, {"micro_batch_size": micro, "chosen": "memory budget", "budget_bytes": budget,
                   "saved_bytes_per_token": per_token, "bytes_per_row_budgeted": per_row,
                   "longest_row_tokens": len(longest["input_ids"]), "backward_factor": BACKWARD_FACTOR}


def prompt_text(row: dict) -> str:
    """The text of a row before its output (instruction + input), joined as in row_text."""
    return row_text({key: row.get(key) for key in ("instruction", "input") if row.get(key)} | {"output": ""})


def encode_training_rows(rows: list[dict], tokenizer, cutoff: int, train_on_inputs: bool) -> list[dict]:
    """Token ids and labels per row; with train_on_inputs=False the prompt tokens get label -100."""
    texts = [row_text(row) for row in rows]
    encoded = tokenizer(texts, truncation=True, max_length=cutoff, add_special_tokens=True)["input_ids"]
    if train_on_inputs:
        prompt_lengths = [0] * len(rows)
    else:
        prompts = [prompt_text(row) for row in rows]
        prompt_lengths = [len(ids) for ids in tokenizer(prompts, truncation=True, max_length=cutoff)["input_ids"]]
    items = []
    for ids, prompt_length in zip(encoded, prompt_lengths, strict=True):
        if len(ids) < 2:
            continue
        masked = min(prompt_length, len(ids) - 1)  # keep >= 1 target token
        labels = torch.tensor(ids)
        labels[:masked] = -100
        n_target = len(ids) - max(1, masked)  # targets are labels[1:] that are not -100
        items.append({"input_ids": torch.tensor(ids), "labels": labels, "n_target": n_target})
    if not items:
        raise LayerIFError("no training row has at least 2 tokens")
    return items


def _collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids = pad_sequence([item["input_ids"] for item in items], batch_first=True, padding_value=pad_id)
    labels = pad_sequence([item["labels"] for item in items], batch_first=True, padding_value=-100)
    mask = pad_sequence([torch.ones_like(item["input_ids"]) for item in items], batch_first=True, padding_value=0)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """Warm-up length: explicit steps, a fraction of all steps, or min(100, 10 % of the steps)."""
    if config.warmup is None:
        return min(100, math.ceil(0.1 * total_steps))
    if isinstance(config.warmup, float) and config.warmup < 1:
        return math.ceil(config.warmup * total_steps)
    return int(config.warmup)


def train_moe(model: nn.Module, tokenizer, rows: list[dict], config: TrainConfig | None = None,
              quiet: bool = False, on_step: Callable[[int], None] | None = None) -> dict:
    """Train the model's trainable (LoRA-MoE) parameters on `rows`; returns a small log (losses, timing).

    `on_step(step)` runs after every optimizer step (e.g. a validation curve); the model is put back in
    training mode after it.
    """
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    layers = moe_layers(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not layers or not parameters:
        raise LayerIFError("the model has no LoRA-MoE layers to train (inject a LoRA-MoE first)")
    lb_coef = config.load_balancing
    if lb_coef is None:
        lb_coef = getattr(getattr(model, "moe_config", None), "load_balancing", 0.0)
    for module in layers.values():
        module.compute_aux = lb_coef > 0

    torch.manual_seed(config.seed)
    items = encode_training_rows(rows, tokenizer, config.cutoff, config.train_on_inputs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    micro_batch_size, memory_plan = plan_micro_batch(model, items, config, pad_id)
    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    total_steps = config.steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    warmup = warmup_steps(config, total_steps)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total_steps))
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device

    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    step = 0
    progress = tqdm(total=total_steps, desc="train", disable=quiet, unit="step")
    try:
        while step < total_steps:
            order = torch.randperm(len(items), generator=generator).tolist()
            for first in range(0, len(order), config.batch_size):
                if step >= total_steps:
                    break
                batch_items = [items[i] for i in order[first : first + config.batch_size]]
                n_tokens = sum(item["n_target"] for item in batch_items)
                step_loss = 0.0
                for micro_first in range(0, len(batch_items), micro_batch_size):
                    micro = _collate(batch_items[micro_first : micro_first + micro_batch_size], pad_id)
                    micro = {key: value.to(device) for key, value in micro.items()}
                    set_token_mask(model, micro["attention_mask"].bool())
                    # Sum over tokens, divided by the tokens of the whole step: every token weighs the same
                    # whatever micro-batch it lands in.
                    loss = token_loss(model, micro) / max(1, n_tokens)
                    balance = aux_loss(model)
                    if balance is not None:
                        share = len(micro["input_ids"]) / len(batch_items)
                        loss = loss + lb_coef * balance * share
                    loss.backward()
                    step_loss += float(loss.detach())
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
                step += 1
                if on_step is not None:
                    on_step(step)
                    model.train()
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.3f}")
    finally:
        progress.close()
        set_token_mask(model, None)
        model.eval()
    return {
        "config": asdict(config),
        "rows": len(items),
        "steps": total_steps,
        "warmup_steps": warmup,
        "losses": losses,
        "final_loss": float(sum(losses[-10:]) / len(losses[-10:])),
        "seconds": time.perf_counter() - started,
        "load_balancing": lb_coef,
        "micro_batch_size": micro_batch_size,
        "memory_plan": memory_plan,
    }
