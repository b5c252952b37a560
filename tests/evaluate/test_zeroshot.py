"""Zero-shot multiple choice through lm-eval on local task files, checked against a direct log-likelihood."""

from __future__ import annotations

import pytest
import torch

from layerif.errors import LayerIFError
from layerif.evaluate.zeroshot import load_task_docs, resolve_task, row_to_doc, zeroshot_accuracy
from tests.conftest import SHARED_DATA, WORDS, tiny_llama
from tests.helpers import hf_tokenizer, write_jsonl


def mc_rows(n: int, n_choices: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        picks = torch.randint(0, len(WORDS), (n_choices + 3,), generator=generator).tolist()
        choices = " ".join(f"Answer{k + 1}: {WORDS[picks[k]]} {WORDS[picks[k + 1]]}" for k in range(n_choices))
        formats = "/".join(f"answer{k + 1}" for k in range(n_choices))
        question = " ".join(WORDS[p] for p in picks[-3:])
        rows.append({"instruction": f"Please choose the correct answer to the question: {question}\n\n{choices}"
                                    f"\n\nAnswer format: {formats}",
                     "input": "", "output": "", "answer": f"answer{i % n_choices + 1}"})
    return rows


def direct_accuracy(model, tokenizer, docs) -> tuple[float, float]:
    """acc and acc_norm by summing continuation log-probabilities (the lm-eval protocol, written out)."""
    hits = hits_norm = 0
    for doc in docs:
        context = tokenizer(doc["context"])["input_ids"]
        scores, normed = [], []
        for choice in doc["choices"]:
            full = tokenizer(doc["context"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([full[:-1]])).logits[0].log_softmax(-1)
            targets = torch.tensor(full[len(context):])
            ll = float(logprobs[len(context) - 1 :].gather(1, targets.unsqueeze(1)).sum())
            scores.append(ll)
            normed.append(ll / len(" " + choice))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
        hits_norm += int(max(range(len(normed)), key=normed.__getitem__) == doc["gold"])
    return hits / len(docs), hits_norm / len(docs)


def test_lm_eval_matches_direct_log_likelihood(tmp_path):
    model, tokenizer = tiny_llama(layers=2), hf_tokenizer()
    write_jsonl(tmp_path / "mc.jsonl", mc_rows(12))
    labels = [{"instruction": f"Please answer the following question with true or false, question: {w} tree?"
                              "\n\nAnswer format: true/false", "input": "", "output": "",
               "answer": "true" if i % 3 else "false"} for i, w in enumerate(WORDS[:9])]
    write_jsonl(tmp_path / "yesno.jsonl", labels)
    result = zeroshot_accuracy(model, tokenizer, [str(tmp_path / "mc.jsonl"), str(tmp_path / "yesno.jsonl")],
                               limit=10, batch_size=4, quiet=True)
    for name, n in (("mc", 10), ("yesno", 9)):
        docs = load_task_docs(tmp_path / f"{name}.jsonl", name, 10)
        acc, acc_norm = direct_accuracy(model, tokenizer, docs)
        entry = result["tasks"][name]
        assert entry["n"] == n
        assert entry["acc"] == pytest.approx(acc)
        assert entry["acc_norm"] == pytest.approx(acc_norm)
        assert entry["acc_stderr"] == pytest.approx((acc * (1 - acc) / (n - 1)) ** 0.5)
        # per-row correctness in row order, consistent with the direct computation row by row
        assert len(entry["correct"]) == n and set(entry["correct"]) <= {0, 1}
        assert [direct_accuracy(model, tokenizer, [doc])[0] for doc in docs] == entry["correct"]
        assert sum(entry["correct_norm"]) / n == pytest.approx(acc_norm)
    assert result["mean_acc"] == pytest.approx((result["tasks"]["mc"]["acc"] + result["tasks"]["yesno"]["acc"]) / 2)


def test_row_parsing_templates():
    doc = row_to_doc(mc_rows(1, 3)[0], [], "arc_easy", 0)
    assert doc["context"].startswith("Question: ") and doc["context"].endswith("\nAnswer:")
    assert len(doc["choices"]) == 3 and doc["gold"] == 0
    assert "Answer" not in " ".join(doc["choices"])
    rte = {"instruction": "Tell me if the statements entailment, not entailment.\nSentence 1: a b.\nSentence 2: c.\n",
           "answer": "not entailment"}
    doc = row_to_doc(rte, ["entailment", "not entailment"], "rte", 0)
    assert doc == {"context": "a b.\nQuestion: c. True or False?\nAnswer:", "choices": ["True", "False"], "gold": 1}
    other = {"instruction": "Is it red or blue?", "input": "the sky", "answer": "blue"}
    doc = row_to_doc(other, ["blue", "red"], "colours", 0)
    assert doc["choices"] == ["blue", "red"] and doc["gold"] == 0 and "the sky" in doc["context"]


def test_bad_task_files_raise(tmp_path):
    write_jsonl(tmp_path / "nochoice.jsonl", [{"instruction": "Say something.", "output": "x", "answer": "x"}] * 3)
    with pytest.raises(LayerIFError, match="no choices"):
        load_task_docs(tmp_path / "nochoice.jsonl", "nochoice")
    bad_gold = mc_rows(2)
    bad_gold[1]["answer"] = "answer9"
    write_jsonl(tmp_path / "badgold.jsonl", bad_gold)
    with pytest.raises(LayerIFError, match="answer9"):
        load_task_docs(tmp_path / "badgold.jsonl", "badgold")
    with pytest.raises(LayerIFError, match="data-dir"):
        resolve_task("boolq", None)
    with pytest.raises(LayerIFError, match="test.jsonl"):
        resolve_task("nosuchtask", tmp_path)


@pytest.mark.real
@pytest.mark.skipif(not (SHARED_DATA / "zeroshot").is_dir(), reason="shared benchmark data not present")
def test_every_shared_task_file_parses():
    for task in ("boolq", "rte", "arc_easy", "arc_challenge", "openbookqa"):
        name, path = resolve_task(task, SHARED_DATA)
        docs = load_task_docs(path, name)
        assert len(docs) > 100
        assert all(0 <= doc["gold"] < len(doc["choices"]) and all(doc["choices"]) for doc in docs)
        assert {len(doc["choices"]) for doc in docs} <= {2, 3, 4, 5}  # ARC has a few 3- and 5-choice rows
