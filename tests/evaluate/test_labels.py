"""Label accuracy: templates, answer parsing, cached log-likelihood against a plain forward, batched generation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from layerif.errors import LayerIFError
from layerif.evaluate.labels import (
    accuracy_with_stderr,
    answer_template,
    generate_accuracy,
    label_set,
    loglik_accuracy,
    normalise_answer,
    prompt_of,
    write_eval_json,
)
from tests.moe.tiny import char_tokenizer, task_rows, tiny_gpt2, tiny_llama


def test_answer_template_and_normalisation():
    row = {"instruction": "Q?\n", "input": "", "output": "Answer: not equivalent.", "answer": "not equivalent"}
    assert answer_template(row) == "Answer: {label}."
    letters = {"output": "Answer: The answer is B.", "answer": "B"}
    assert answer_template(letters).format(label="D") == "Answer: The answer is D."
    assert answer_template({"output": "", "answer": "x"}) == "Answer: {label}."
    assert normalise_answer(" Answer: The answer is B.\nmore") == "b"
    assert normalise_answer("Answer: not equivalent. Because") == "not equivalent"
    assert normalise_answer("equivalent") == "equivalent"
    assert prompt_of(row) == "Q?\n"


def test_label_set_and_stderr():
    assert label_set([{"answer": "b"}, {"answer": "a"}, {"answer": "b"}]) == ["a", "b"]
    with pytest.raises(LayerIFError):
        label_set([{"answer": "a"}])
    p, se = accuracy_with_stderr([True, False, True, True])
    assert p == 0.75 and se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))


def _naive_scores(model, tokenizer, rows, labels):
    scores = torch.empty(len(rows), len(labels), dtype=torch.float64)
    for r, row in enumerate(rows):
        prompt = tokenizer([prompt_of(row)])["input_ids"][0]
        for c, label in enumerate(labels):
            cont = tokenizer([answer_template(row).format(label=label)], add_special_tokens=False)["input_ids"][0]
            ids = torch.tensor([prompt + cont])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            picked = logprobs.gather(-1, ids[0, 1:, None]).squeeze(-1)
            scores[r, c] = picked[len(prompt) - 1:].sum()
    return scores


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_loglik_with_shared_prompt_matches_plain_forward(builder):
    tokenizer = char_tokenizer()
    model = builder()
    rows = task_rows(7, seed=1)
    rows[2] = rows[2] | {"instruction": "A much longer question about whether 10 is even or odd?\n"}
    labels = ["even", "odd", "neither"]  # continuations of different lengths
    reference = _naive_scores(model, tokenizer, rows, labels)
    result = loglik_accuracy(model, tokenizer, rows, labels=labels, batch_size=3, quiet=True)
    expected = [labels[i] for i in reference.argmax(1).tolist()]
    assert result.predictions == expected
    hits = [p == row["answer"] for p, row in zip(expected, rows, strict=True)]
    assert result.correct == sum(hits) and result.n == 7

    # The scores themselves, not just the argmax: compare through the private helper.
    from layerif.evaluate.labels import _continuation_logprobs

    prompts = tokenizer([prompt_of(row) for row in rows])["input_ids"]
    conts = tokenizer([answer_template(rows[0]).format(label=label) for label in labels],
                      add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        got = _continuation_logprobs(model, prompts, conts, tokenizer.pad_token_id)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-5)


def test_generation_batched_equals_one_by_one_and_scores_hits():
    tokenizer = char_tokenizer()
    model = tiny_llama()
    rows = task_rows(5, seed=2)
    rows[0] = rows[0] | {"instruction": "Is 1234567 even or odd? Think.\n"}
    one = generate_accuracy(model, tokenizer, rows, max_new_tokens=6, batch_size=1, quiet=True)
    many = generate_accuracy(model, tokenizer, rows, max_new_tokens=6, batch_size=5, quiet=True)
    assert one.predictions == many.predictions
    # Rows whose gold answer is what the model says are all hits.
    relabelled = [row | {"answer": normalise_answer(text) or "x"} for row, text in zip(rows, one.predictions, strict=True)]
    again = generate_accuracy(model, tokenizer, relabelled, max_new_tokens=6, batch_size=2, quiet=True)
    assert again.accuracy == pytest.approx(
        sum(normalise_answer(t) != "" for t in one.predictions) / len(rows))


def test_eval_json(tmp_path):
    tokenizer = char_tokenizer()
    rows = task_rows(4)
    result = loglik_accuracy(tiny_llama(), tokenizer, rows, quiet=True)
    write_eval_json(tmp_path / "eval.json", {"loglik": result}, rows, {"test": "toy"})
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["metrics"]["loglik"]["n"] == 4 and data["test"] == "toy"
    assert len(data["predictions"]) == 4 and set(data["predictions"][0]) == {"answer", "loglik"}


def test_missing_answers_rejected():
    with pytest.raises(LayerIFError):
        loglik_accuracy(tiny_llama(), char_tokenizer(), [{"instruction": "x", "output": "y"}], labels=["a", "b"])


@pytest.mark.real
@pytest.mark.parametrize("task", ["mrpc", "cola", "rte", "openbookqa", "commonsenseqa", "scienceqa"])
def test_benchmark_rows_parse(task):
    from tests.moe.tiny import SHARED_DATA

    path = SHARED_DATA / "moe" / task / "test.jsonl"
    if not path.is_file():
        pytest.skip("shared benchmark data not present")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:200]]
    labels = label_set(rows)
    for row in rows:
        assert "{label}" in answer_template(row)
        assert answer_template(row).format(label=row["answer"]) == row["output"]
        assert normalise_answer(row["output"]) == row["answer"].lower()
        assert row["answer"] in labels
