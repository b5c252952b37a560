"""Loading rows from files and datasets folders, texts, selection, tokenisation and batches."""

from __future__ import annotations

import json

import pytest
import torch

from layerif.data import demo_rows, encode_texts, load_rows, make_batches, row_text, select_rows
from layerif.data.tokens import per_sample_loss
from layerif.errors import LayerIFError
from tests.conftest import SHARED_DATA, TinyTokenizer
from tests.helpers import instruction_rows, write_jsonl


def test_jsonl_json_csv_load_the_same_rows(tmp_path):
    rows = instruction_rows(5)
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    header = "instruction,input,output,answer\n"
    (tmp_path / "a.csv").write_text(header + "".join(f'"{r["instruction"]}",,"{r["output"]}",{r["answer"]}\n' for r in rows))
    texts = [[row_text(r) for r in load_rows(tmp_path / f"a.{ext}")] for ext in ("jsonl", "json", "csv")]
    assert texts[0] == texts[1] == texts[2]
    assert texts[0][0] == rows[0]["instruction"] + "\n" + rows[0]["output"]


def test_text_column_and_datasets_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "alpha beta"}, {"text": "gamma delta"}])
    write_jsonl(folder / "validation.jsonl", [{"text": "red green"}])
    rows = load_rows(str(folder), split="validation")
    assert [row_text(r) for r in rows] == ["red green"]


@pytest.mark.parametrize(
    "content, message",
    [("", "no rows"), ('{"foo": 1}\n', "rows need a 'text' column"), ("{bad json\n", "line 1 is not valid JSON")],
)
def test_bad_files(tmp_path, content, message):
    (tmp_path / "f.jsonl").write_text(content)
    with pytest.raises(LayerIFError, match=message):
        load_rows(tmp_path / "f.jsonl")


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(LayerIFError, match="data file not found"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "x.parquetx").write_text("x")
    with pytest.raises(LayerIFError, match="unsupported file type"):
        load_rows(tmp_path / "x.parquetx")


def test_select_rows_first_or_seeded():
    rows = list(range(10))
    assert select_rows(rows, 3) == [0, 1, 2]
    seeded = select_rows(rows, 4, seed=1)
    assert seeded == select_rows(rows, 4, seed=1) and len(set(seeded)) == 4 and seeded != [0, 1, 2, 3]
    with pytest.raises(LayerIFError, match="only 10"):
        select_rows(rows, 11)


def test_padding_never_enters_the_loss():
    tok = TinyTokenizer()
    encoded = encode_texts(["alpha beta gamma", "delta epsilon zeta eta theta iota"], tok, 16)
    (batch,) = make_batches(encoded, 2, tok.pad_token_id)
    assert (batch.labels[0, 4:] == -100).all() and batch.attention_mask[0].sum() == 4
    logits = torch.randn(2, batch.input_ids.shape[1], 64)
    alone = per_sample_loss(logits[:1, :4], batch.labels[:1, :4])
    assert torch.allclose(per_sample_loss(logits, batch.labels)[0], alone[0])


def test_too_short_after_truncation():
    with pytest.raises(LayerIFError, match="sample 1 has 1 real token"):
        encode_texts(["alpha beta", ""], TinyTokenizer(), 8)


def test_demo_rows_deterministic():
    assert demo_rows("facts", 20) == demo_rows("facts", 20)
    assert len({row_text(r) for r in demo_rows("facts", 60)}) > 20
    with pytest.raises(LayerIFError, match="unknown demo task"):
        demo_rows("nope")


@pytest.mark.skipif(not (SHARED_DATA / "moe" / "mrpc").is_dir(), reason="shared benchmark data not present")
def test_shared_mrpc_loads_as_is():
    rows = load_rows(SHARED_DATA / "moe" / "mrpc" / "train.jsonl")
    assert len(rows) == 3668 and row_text(rows[0]).endswith("Answer: equivalent.")
