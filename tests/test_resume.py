"""Checkpoint and resume: interrupted runs end equal to clean ones; changed inputs and damaged units are caught."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import layerif.influence.engine as engine
from layerif.api import ScoreConfig, score_layers
from layerif.errors import LayerIFError
from layerif.scores import LayerScores
from tests.conftest import TinyTokenizer, tiny_llama, tiny_texts
from tests.helpers import instruction_rows, save_tiny_model, write_jsonl

TRAIN, VAL = tiny_texts(10, seed=50), tiny_texts(3, seed=51)


def crash_after(monkeypatch, passes: int):
    """Make the engine's `run_pass` fail on call number passes + 1."""
    real, calls = engine.run_pass, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > passes:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_pass", failing)


@pytest.mark.parametrize("strategy, passes_before_crash", [("store", 4), ("stream", 3)])
def test_resume_equals_clean_run(tmp_path, monkeypatch, strategy, passes_before_crash):
    config = ScoreConfig(quiet=True, batch_size=4, max_memory=1, strategy=strategy)
    clean = score_layers(tiny_llama(layers=3, seed=2), TinyTokenizer(), TRAIN, VAL, config)
    crash_after(monkeypatch, passes_before_crash)
    with pytest.raises(KeyboardInterrupt):
        score_layers(tiny_llama(layers=3, seed=2), TinyTokenizer(), TRAIN, VAL, config, checkpoint_dir=str(tmp_path))
    monkeypatch.undo()
    resumed = score_layers(tiny_llama(layers=3, seed=2), TinyTokenizer(), TRAIN, VAL, config,
                           checkpoint_dir=str(tmp_path))
    assert resumed.metadata["resumed"]["units_loaded"]
    torch.testing.assert_close(resumed.q, clean.q, rtol=1e-6, atol=0)


def test_changed_config_or_data_is_refused(tmp_path):
    config = ScoreConfig(quiet=True, batch_size=4)
    score_layers(tiny_llama(layers=2), TinyTokenizer(), TRAIN, VAL, config, checkpoint_dir=str(tmp_path))
    with pytest.raises(LayerIFError, match="different config"):
        score_layers(tiny_llama(layers=2), TinyTokenizer(), TRAIN, VAL, ScoreConfig(quiet=True, estimator="identity"),
                     checkpoint_dir=str(tmp_path))
    with pytest.raises(LayerIFError, match="different data"):
        score_layers(tiny_llama(layers=2), TinyTokenizer(), TRAIN[::-1], VAL, config, checkpoint_dir=str(tmp_path))
    restarted = score_layers(tiny_llama(layers=2), TinyTokenizer(), TRAIN[::-1], VAL, config,
                             checkpoint_dir=str(tmp_path), restart=True)
    assert restarted.metadata["resumed"] is None


def test_corrupt_unit_is_reported_and_recomputed(tmp_path, capsys):
    config = ScoreConfig(quiet=True, batch_size=4, max_memory=1, strategy="store")
    clean = score_layers(tiny_llama(layers=3, seed=3), TinyTokenizer(), TRAIN, VAL, config,
                         checkpoint_dir=str(tmp_path))
    unit = tmp_path / "layer-0001.safetensors"
    unit.write_bytes(unit.read_bytes()[:-7])  # truncated
    again = score_layers(tiny_llama(layers=3, seed=3), TinyTokenizer(), TRAIN, VAL, config,
                         checkpoint_dir=str(tmp_path))
    assert "layer-0001 is missing or corrupt" in capsys.readouterr().err
    assert again.metadata["resumed"]["units_recomputed"] == ["layer-0001"]
    assert again.metadata["plan"]["groups"] == [[1]]
    torch.testing.assert_close(again.q, clean.q, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_kill_9_then_same_command_resumes(tmp_path):
    save_tiny_model(tmp_path / "model", layers=6)
    write_jsonl(tmp_path / "train.jsonl", instruction_rows(40, seed=5))
    write_jsonl(tmp_path / "val.jsonl", instruction_rows(6, seed=6))

    def command(out):
        return [sys.executable, "-m", "layerif", "score", "--model", str(tmp_path / "model"), "--train",
                str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.jsonl"), "--n-train", "40", "--n-val", "6",
                "--max-memory", "1", "--strategy", "store", "--batch-size", "2", "--out", str(out), "--quiet"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "clean"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300

    def units_recorded() -> bool:
        try:
            return bool(json.loads((out / ".checkpoint" / "manifest.json").read_text())["units"])
        except (OSError, ValueError, KeyError):
            return False

    while time.time() < deadline and not units_recorded():
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "run.json").exists()
    subprocess.run(command(out), check=True, env=env, capture_output=True)
    record = json.loads((out / "run.json").read_text())
    assert record["resumed"] and record["resumed"]["units_loaded"]
    assert not (out / ".checkpoint").exists()
    torch.testing.assert_close(LayerScores.load(out).q, LayerScores.load(tmp_path / "clean").q, rtol=1e-6, atol=0)
