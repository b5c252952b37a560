"""Zero-shot multiple-choice accuracy by log-likelihood, through lm-evaluation-harness on local JSONL task files.

Rows follow the instruction format of the benchmark data (`instruction`, `input`, `output`, `answer`). Each row
becomes an lm-eval document {context, choices, gold}; the prompts follow lm-eval's own templates for these
tasks (ARC: "Question: …\\nAnswer:", OpenBookQA: the question stem, BoolQ: yes/no, RTE: True/False), and any
other file is scored on its instruction with the choices it spells out (`Answer1: …`) or its label set.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from torch import nn

from layerif.errors import LayerIFError

DEFAULT_TASKS = ("boolq", "rte", "arc_easy", "arc_challenge", "openbookqa")
TASK_DIRS = ("zeroshot", "moe")  # where a task name is looked up under --data-dir
_CHOICE = re.compile(r"Answer(\d+):\s*(.*?)(?=\s*Answer\d+:|\n\s*\n|$)", re.S)
_FORMAT = re.compile(r"Answer format:\s*(\S.*?)\s*$", re.M)
_MC_PREFIX = re.compile(r"^\s*Please choose the correct answer to the question:\s*", re.I)
_BOOLQ = re.compile(r"question:\s*(.*?)\s*(?:\n\s*\n|Answer format:|$)", re.S | re.I)
_RTE = re.compile(r"Sentence 1:\s*(.*?)\s*\n\s*Sentence 2:\s*(.*?)\s*$", re.S)


def resolve_task(task: str, data_dir: str | Path | None) -> tuple[str, Path]:
    """(name, file) of a task: a JSONL path, or a name found as <data-dir>/{zeroshot,moe}/<name>/test.jsonl."""
    path = Path(task)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):
        if not path.is_file():
            raise LayerIFError(f"task file not found: {task}")
        return path.stem if path.stem not in ("test", "validation") else path.parent.name, path
    if data_dir is None:
        raise LayerIFError(f"task {task!r} is a name: pass --data-dir (the folder holding zeroshot/ and moe/)")
    for folder in TASK_DIRS:
        candidate = Path(data_dir) / folder / task / "test.jsonl"
        if candidate.is_file():
            return task, candidate
    raise LayerIFError(f"task {task!r}: no {'/'.join(TASK_DIRS)}/{task}/test.jsonl under {data_dir}")


def _instruction(row: dict) -> str:
    text = str(row.get("instruction") or "")
    extra = str(row.get("input") or "")
    return f"{text}\n{extra}" if extra.strip() else text


def _label_set(rows: list[dict]) -> list[str]:
    match = _FORMAT.search(_instruction(rows[0]))
    if match and "/" in match.group(1):
        return [label.strip() for label in match.group(1).split("/")]
    return sorted({str(row.get("answer", "")).strip() for row in rows})


def row_to_doc(row: dict, labels: list[str], task: str, position: int) -> dict:
    """One lm-eval document {context, choices, gold} from an instruction-format row."""
    text = _instruction(row)
    answer = str(row.get("answer", "")).strip()
    choices = [(int(number), choice.strip()) for number, choice in _CHOICE.findall(text)]
    if choices:
        numbers = [number for number, _ in choices]
        if numbers != list(range(1, len(numbers) + 1)) or any(not choice for _, choice in choices):
            raise LayerIFError(f"task {task}: row {position} has malformed choices (Answer1: … AnswerN: …)")
        gold_match = re.fullmatch(r"answer(\d+)", answer, re.I)
        if not gold_match or not 1 <= int(gold_match.group(1)) <= len(choices):
            raise LayerIFError(f"task {task}: row {position} answer {answer!r} is not one of answer1..answer{len(choices)}")
        question = _MC_PREFIX.sub("", text[: text.find("Answer1:")]).strip()
        context = question if task == "openbookqa" else f"Question: {question}\nAnswer:"
        return {"context": context, "choices": [choice for _, choice in choices], "gold": int(gold_match.group(1)) - 1}
    if len(labels) < 2:
        raise LayerIFError(f"task {task}: row {position} has no choices (no 'Answer1:' list, and fewer than two labels)")
    lowered = [label.lower() for label in labels]
    if answer.lower() not in lowered:
        raise LayerIFError(f"task {task}: row {position} answer {answer!r} is not among the labels {labels}")
    gold = lowered.index(answer.lower())
    if sorted(lowered) == ["false", "true"]:  # BoolQ: lm-eval asks yes/no
        question = _BOOLQ.search(text)
        body = question.group(1).rstrip("?") if question else text.strip()
        return {"context": f"Question: {body}?\nAnswer:", "choices": ["no", "yes"],
                "gold": 1 if answer.lower() == "true" else 0}
    rte = _RTE.search(text)
    if rte and sorted(lowered) == ["entailment", "not entailment"]:  # RTE: lm-eval asks True/False
        return {"context": f"{rte.group(1)}\nQuestion: {rte.group(2)} True or False?\nAnswer:",
                "choices": ["True", "False"], "gold": 0 if answer.lower() == "entailment" else 1}
    return {"context": f"{text.strip()}\nAnswer:", "choices": list(labels), "gold": gold}


def load_task_docs(path: str | Path, task: str, limit: int | None = None) -> list[dict]:
    """lm-eval documents of a task file (the first `limit` rows)."""
    from layerif.data import load_rows

    rows = load_rows(path)
    if limit is not None:
        if limit < 1:
            raise LayerIFError(f"--limit must be >= 1, got {limit}")
        rows = rows[:limit]
    labels = _label_set(rows)
    return [row_to_doc(row, labels, task, position) for position, row in enumerate(rows)]


def _lm_eval_task(name: str, docs: list[dict]):
    from datasets import Dataset, DatasetDict
    from lm_eval.api.task import ConfigurableTask

    config = {
        "task": name,
        "custom_dataset": lambda **_: DatasetDict({"test": Dataset.from_list(docs)}),
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": lambda doc: doc["context"],
        "doc_to_choice": lambda doc: doc["choices"],
        "doc_to_target": lambda doc: doc["gold"],
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return ConfigurableTask(config=config)


def zeroshot_accuracy(
    model: nn.Module,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    quiet: bool = False,
) -> dict:
    """Accuracy (and length-normalised accuracy) per task with standard errors and n, plus the mean accuracy.

    Each task also lists `correct` and `correct_norm`: per-row 0/1 correctness in row order (for paired statistics).
    """
    import logging

    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise LayerIFError("no zero-shot tasks given")
    resolved = [resolve_task(task, data_dir) for task in tasks]
    names = [name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise LayerIFError(f"task names must be distinct, got {', '.join(names)}")
    docs = {name: load_task_docs(path, name, limit) for name, path in resolved}
    level = logging.getLogger("lm_eval").level
    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        device = next(model.parameters()).device
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        task_dict = {name: _lm_eval_task(name, task_docs) for name, task_docs in docs.items()}
        output = evaluator.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=1000, log_samples=True,
                                    verbosity="ERROR" if quiet else "INFO")
    finally:
        logging.getLogger("lm_eval").setLevel(level)
    results = {}
    for name, path in resolved:
        metrics = output["results"][name]
        samples = sorted(output["samples"][name], key=lambda sample: sample["doc_id"])
        if [sample["doc_id"] for sample in samples] != list(range(len(docs[name]))):
            raise RuntimeError(f"lm-eval returned samples that do not cover the rows of {name} once each")
        results[name] = {
            "acc": float(metrics["acc,none"]),
            "acc_stderr": float(metrics["acc_stderr,none"]),
            "acc_norm": float(metrics["acc_norm,none"]),
            "acc_norm_stderr": float(metrics["acc_norm_stderr,none"]),
            "n": len(docs[name]),
            "file": str(path),
            "correct": [int(sample["acc"]) for sample in samples],
            "correct_norm": [int(sample["acc_norm"]) for sample in samples],
        }
    accs = [entry["acc"] for entry in results.values()]
    # stderr of the mean of independent task accuracies
    mean_stderr = math.sqrt(sum(entry["acc_stderr"] ** 2 for entry in results.values())) / len(results)
    return {"tasks": results, "mean_acc": sum(accs) / len(accs), "mean_acc_stderr": mean_stderr,
            "protocol": "lm-eval log-likelihood multiple choice, zero-shot", "limit": limit}
