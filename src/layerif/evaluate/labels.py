"""Label accuracy of instruction-tuned tasks: greedy generation matched against `answer`, or label log-likelihood."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from layerif.data import row_text
from layerif.errors import LayerIFError
from layerif.io import atomic_write_json

DEFAULT_TEMPLATE = "Answer: {label}."


@dataclass
class LabelAccuracy:
    """Accuracy over n rows with its binomial standard error, plus the per-row predictions."""

    method: str
    accuracy: float
    stderr: float
    n: int
    correct: int
    predictions: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("predictions")
        return data


def accuracy_with_stderr(hits: torch.Tensor | list[bool]) -> tuple[float, float]:
    """Mean of 0/1 hits and its standard error sqrt(p (1 - p) / n)."""
    hits = torch.as_tensor(hits, dtype=torch.float64)
    if hits.numel() == 0:
        raise LayerIFError("no rows to evaluate")
    p = float(hits.mean())
    return p, math.sqrt(p * (1 - p) / hits.numel())


def prompt_of(row: dict) -> str:
    """Instruction + input of a row: the text the model continues."""
    return row_text({"instruction": row.get("instruction") or "", "input": row.get("input") or "", "output": ""})


def answer_template(row: dict) -> str:
    """The row's output with its answer replaced by `{label}` (e.g. "Answer: The answer is {label}.")."""
    output, answer = str(row.get("output") or ""), str(row.get("answer") or "")
    position = output.rfind(answer) if answer else -1
    if position < 0:
        return DEFAULT_TEMPLATE
    return output[:position].replace("{", "{{").replace("}", "}}") + "{label}" + \
        output[position + len(answer):].replace("{", "{{").replace("}", "}}")


def label_set(rows: list[dict]) -> list[str]:
    """The task's labels: the distinct `answer` values, sorted."""
    labels = sorted({str(row["answer"]) for row in rows if row.get("answer") not in (None, "")})
    if len(labels) < 2:
        raise LayerIFError(f"need >= 2 distinct labels to score by log-likelihood, found {labels}")
    return labels


def _check_rows(rows: list[dict]) -> None:
    if not rows:
        raise LayerIFError("no test rows")
    missing = sum(1 for row in rows if row.get("answer") in (None, ""))
    if missing:
        raise LayerIFError(f"{missing} test row(s) have no `answer` field")


_ANSWER_PREFIX = re.compile(r"^\s*(answer\s*:)?\s*(the answer is)?\s*", re.IGNORECASE)


def normalise_answer(text: str) -> str:
    """The answer part of a generated text: after "Answer:" / "The answer is", up to the first line end or '.'."""
    text = text.strip().split("\n", 1)[0]
    text = _ANSWER_PREFIX.sub("", text, count=1)
    text = re.split(r"\.(\s|$)", text, maxsplit=1)[0]
    return text.strip().strip(".").strip().lower()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask."""
    flipped = [torch.tensor(ids[::-1], dtype=torch.long) for ids in rows]
    ids = pad_sequence(flipped, batch_first=True, padding_value=pad_id).flip(1)
    mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True).flip(1)
    return ids.to(device), mask.to(device)


def _continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int) -> torch.Tensor:
    """[B, C] total log-prob of each continuation after each prompt; the prompt is run once (KV cache)."""
    device = _device(model)
    n_rows, n_cont = len(prompts), len(continuations)
    ids, mask = _left_pad(prompts, pad_id, device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
    first_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's 1st token
    cont = pad_sequence([torch.tensor(c, dtype=torch.long) for c in continuations], batch_first=True,
                        padding_value=pad_id).to(device)  # [C, Lc]
    cont_len = torch.tensor([len(c) for c in continuations], device=device)
    totals = first_lp[:, cont[:, 0]]  # [B, C]
    if cont.shape[1] > 1:
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.batch_repeat_interleave(n_cont)
        steps = cont.shape[1] - 1
        cont_in = cont[:, :-1].repeat(n_rows, 1)  # row-major: (row, label)
        cont_mask = (torch.arange(steps, device=device)[None] < (cont_len[:, None] - 1)).long().repeat(n_rows, 1)
        full_mask = torch.cat([mask.repeat_interleave(n_cont, 0), cont_mask], dim=1)
        start = mask.sum(-1).repeat_interleave(n_cont)[:, None]
        cont_pos = start + torch.arange(steps, device=device)[None]
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        logits = model(input_ids=cont_in, attention_mask=full_mask, position_ids=cont_pos, use_cache=True,
                       **{cache_arg: cache}).logits.float()
        next_lp = torch.log_softmax(logits, dim=-1).gather(-1, cont[:, 1:].repeat(n_rows, 1)[..., None]).squeeze(-1)
        totals = totals + (next_lp * cont_mask).sum(-1).view(n_rows, n_cont)
    return totals.double().cpu()


@torch.no_grad()
def loglik_accuracy(model, tokenizer, rows: list[dict], labels: list[str] | None = None, batch_size: int = 16,
                    max_length: int = 256, quiet: bool = False) -> LabelAccuracy:
    """Pick, per row, the label whose continuation (the row's output template) has the highest log-likelihood."""
    from tqdm.auto import tqdm

    _check_rows(rows)
    labels = labels or label_set(rows)
    prompts = tokenizer([prompt_of(row) for row in rows], add_special_tokens=True)["input_ids"]
    templates = [answer_template(row) for row in rows]
    continuation_ids = {
        template: tokenizer([template.format(label=label) for label in labels], add_special_tokens=False)["input_ids"]
        for template in sorted(set(templates))
    }
    longest = max(len(c) for conts in continuation_ids.values() for c in conts)
    # Keep the continuations whole: trim prompts from the left when too long.
    prompts = [ids[-max(1, max_length - longest):] for ids in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = torch.full((len(rows), len(labels)), float("-inf"), dtype=torch.float64)
    # Rows of one template and similar prompt length share a batch (less padding).
    order = sorted(range(len(rows)), key=lambda i: (templates[i], len(prompts[i])))
    batches = []
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        for template in sorted({templates[i] for i in chunk}):
            batches.append([i for i in chunk if templates[i] == template])
    model.eval()
    for chosen in tqdm(batches, desc="log-likelihood", disable=quiet, unit="batch"):
        template = templates[chosen[0]]
        scores[chosen] = _continuation_logprobs(model, [prompts[i] for i in chosen], continuation_ids[template], pad_id)
    predicted = scores.argmax(dim=1)
    gold = torch.tensor([labels.index(str(row["answer"])) if str(row["answer"]) in labels else -1 for row in rows])
    hits = predicted == gold
    accuracy, stderr = accuracy_with_stderr(hits)
    return LabelAccuracy("loglik", accuracy, stderr, len(rows), int(hits.sum()),
                         [labels[i] for i in predicted.tolist()])


@torch.no_grad()
def generate_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 16, batch_size: int = 16,
                      max_length: int = 256, quiet: bool = False) -> LabelAccuracy:
    """Greedy generation from the prompt; a hit when the normalised answer equals the row's `answer`."""
    from tqdm.auto import tqdm

    _check_rows(rows)
    device = _device(model)
    prompts = [ids[-max_length:] for ids in tokenizer([prompt_of(row) for row in rows])["input_ids"]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    generated: list[str] = [""] * len(rows)
    model.eval()
    for first in tqdm(range(0, len(order), batch_size), desc="generate", disable=quiet, unit="batch"):
        chosen = order[first : first + batch_size]
        # Left padding so that every row's next token comes from the same last position.
        input_ids, mask = _left_pad([prompts[i] for i in chosen], pad_id, device)
        output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
        texts = tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
        for index, text in zip(chosen, texts, strict=True):
            generated[index] = text
    hits = [normalise_answer(text) == str(row["answer"]).strip().lower() for text, row in zip(generated, rows, strict=True)]
    accuracy, stderr = accuracy_with_stderr(hits)
    return LabelAccuracy("generate", accuracy, stderr, len(rows), int(sum(hits)), generated)


def evaluate_labels(model, tokenizer, rows: list[dict], methods: tuple[str, ...] = ("loglik", "generate"),
                    labels: list[str] | None = None, batch_size: int = 16, max_length: int = 256,
                    max_new_tokens: int = 16, quiet: bool = False) -> dict[str, LabelAccuracy]:
    """Run the requested evaluation methods (loglik and/or generate) on `rows`."""
    unknown = set(methods) - {"loglik", "generate"}
    if unknown or not methods:
        raise LayerIFError(f"evaluation methods must be loglik and/or generate, got {sorted(unknown) or methods}")
    results = {}
    if "loglik" in methods:
        results["loglik"] = loglik_accuracy(model, tokenizer, rows, labels, batch_size, max_length, quiet)
    if "generate" in methods:
        results["generate"] = generate_accuracy(model, tokenizer, rows, max_new_tokens, batch_size, max_length, quiet)
    return results


def write_eval_json(path: str | Path, results: dict[str, LabelAccuracy], rows: list[dict], extra: dict | None = None) -> Path:
    """eval.json: accuracy ± standard error per method, then the arguments and per-row predictions."""
    payload = {
        "metrics": {name: result.summary() for name, result in results.items()},
        **(extra or {}),
        "predictions": [
            {"answer": row.get("answer"), **{name: result.predictions[i] for name, result in results.items()}}
            for i, row in enumerate(rows)
        ],
    }
    return atomic_write_json(path, payload)
