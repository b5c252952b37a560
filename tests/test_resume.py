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
from layerif.gradients.factors import FactorChunk, MatrixFactors
from layerif.gradients.spill import SpillCorrupt, SpillStore
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


def damage(path, how: str) -> None:
    """Truncate a file by 7 bytes, or flip one bit in its last quarter (inside the tensor data)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[:-7]))
        return
    data[len(data) * 3 // 4] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_unit_is_reported_and_recomputed(tmp_path, capsys, how):
    config = ScoreConfig(quiet=True, batch_size=4, max_memory=1, strategy="store")
    clean = score_layers(tiny_llama(layers=3, seed=3), TinyTokenizer(), TRAIN, VAL, config,
                         checkpoint_dir=str(tmp_path))
    unit = tmp_path / "layer-0001.safetensors"
    damage(unit, how)
    again = score_layers(tiny_llama(layers=3, seed=3), TinyTokenizer(), TRAIN, VAL, config,
                         checkpoint_dir=str(tmp_path))
    assert "layer-0001 is missing or corrupt" in capsys.readouterr().err
    assert again.metadata["resumed"]["units_recomputed"] == ["layer-0001"]
    assert again.metadata["plan"]["groups"] == [[1]]
    torch.testing.assert_close(again.q, clean.q, rtol=1e-6, atol=0)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_spill_file_is_reported_and_recomputed(tmp_path, capsys, monkeypatch, how):
    config = ScoreConfig(quiet=True, batch_size=4, strategy="spill")
    clean = score_layers(tiny_llama(layers=3, seed=4), TinyTokenizer(), TRAIN, VAL, config)
    real, damaged = SpillStore.finish_writing, []

    def finish_then_damage(store):
        real(store)
        if not damaged:  # the first spill only: the recomputation must then succeed
            target = store.path("train", 1)
            damage(target, how)
            damaged.append(target)

    monkeypatch.setattr(SpillStore, "finish_writing", finish_then_damage)
    again = score_layers(tiny_llama(layers=3, seed=4), TinyTokenizer(), TRAIN, VAL, config,
                         checkpoint_dir=str(tmp_path / "checkpoint"))
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(lines) == 1 and str(damaged[0]) in lines[0] and "recomputing layers 1, 2" in lines[0]
    torch.testing.assert_close(again.q, clean.q, rtol=1e-6, atol=0)


def test_spill_store_refuses_a_damaged_file(tmp_path):
    store = SpillStore(tmp_path)
    x, delta = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    store.write("train", 0, 0, FactorChunk(torch.arange(2), x, delta), {})
    store.finish_writing()
    assert json.loads((store.directory / "checksums.json").read_text())[store.path("train", 0).name]
    damage(store.path("train", 0), "flip")
    with pytest.raises(SpillCorrupt, match="corrupt"):
        store.factors("train", 0, 0, MatrixFactors(2, 4, 5, torch.float32))
    store.close()
    assert not store.directory.exists()


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


KILLER = """
import os, signal, sys
import layerif.io as io
from layerif.cli import main
kill_at, when, calls = int(sys.argv[1]), sys.argv[2], []
real = io._rename

def renaming(src, dst, exchange=False):
    calls.append(dst)
    if len(calls) == kill_at and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, exchange)
    if len(calls) == kill_at and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

io._rename = renaming
try:
    main(sys.argv[3:])
finally:
    print(len(calls), file=sys.stderr)
"""


@pytest.mark.parametrize("kill_at, when", [(1, "before"), (-1, "before"), (-1, "after"), (-2, "after")])
def test_publish_killed_at_a_rename_leaves_old_or_new_whole(tmp_path, kill_at, when):
    """SIGKILL just before / after a rename (the last one is the folder exchange): old or new run, then a rerun."""
    save_tiny_model(tmp_path / "model", layers=2)
    write_jsonl(tmp_path / "train.jsonl", instruction_rows(8, seed=5))
    write_jsonl(tmp_path / "val.jsonl", instruction_rows(3, seed=6))
    out = tmp_path / "run"
    args = ["score", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.jsonl"), "--val",
            str(tmp_path / "val.jsonl"), "--n-train", "8", "--n-val", "3", "--batch-size", "4", "--out", str(out),
            "--quiet", "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "layerif", *args], check=True, env=env, capture_output=True)
    old, q_old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}, LayerScores.load(out).q
    counted = subprocess.run([sys.executable, "-c", KILLER, "0", "-", *args], env=env, capture_output=True, text=True, check=True)
    total = int(counted.stderr.strip().splitlines()[-1])
    killed = subprocess.run([sys.executable, "-c", KILLER, str(kill_at % total + 1 if kill_at < 0 else kill_at),
                             when, *args], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    now = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    if now != old:  # then it must be the complete new run
        assert set(now) == set(old) and json.loads(now["run.json"])["format"] == "layerif.run/1"
        torch.testing.assert_close(LayerScores.load(out).q, q_old, rtol=1e-6, atol=0)
    subprocess.run([sys.executable, "-m", "layerif", *args], check=True, env=env, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run", "train.jsonl", "val.jsonl"]
    assert {p.name for p in out.iterdir() if p.is_file()} == set(old)
    torch.testing.assert_close(LayerScores.load(out).q, q_old, rtol=1e-6, atol=0)
