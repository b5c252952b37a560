"""Data-parallel scoring on 2 gloo ranks (CPU) equals the single-process result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from layerif.api import ScoreConfig, score_layers
from layerif.scores import LayerScores
from tests.conftest import TinyTokenizer, tiny_llama, tiny_texts
from tests.helpers import instruction_rows, save_tiny_model, write_jsonl

TRAIN, VAL = tiny_texts(11, seed=60), tiny_texts(5, seed=61)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    import torch.distributed as dist

    scores = score_layers(tiny_llama(layers=3, seed=4), TinyTokenizer(), TRAIN, VAL,
                          ScoreConfig(quiet=True, batch_size=3, strategy=strategy))
    if rank == 0:
        torch.save(scores.q, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["store", "spill", "stream"])
def test_two_gloo_ranks_match_single_process(tmp_path, strategy):
    single = score_layers(tiny_llama(layers=3, seed=4), TinyTokenizer(), TRAIN, VAL,
                          ScoreConfig(quiet=True, batch_size=3, strategy=strategy)).q
    out = str(tmp_path / "q.pt")
    mp.spawn(worker, args=(2, free_port(), strategy, out), nprocs=2, join=True)
    parallel = torch.load(out)
    torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-5 * single.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_launched_cli_matches_single_process(tmp_path, launcher):
    save_tiny_model(tmp_path / "model", layers=2)
    write_jsonl(tmp_path / "train.jsonl", instruction_rows(9, seed=1))
    write_jsonl(tmp_path / "val.jsonl", instruction_rows(3, seed=2))
    args = ["-m", "layerif", "score", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.jsonl"),
            "--val", str(tmp_path / "val.jsonl"), "--n-train", "9", "--n-val", "3", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], check=True, env=env, capture_output=True)
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port())]
    else:  # accelerate's multi-process launcher sets the same env as torchrun; without CUDA the ranks use gloo
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port())]
    done = subprocess.run([*command, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["passes"] >= 1 and record["world_size"] == 2
    one, two = LayerScores.load(tmp_path / "one").q, LayerScores.load(tmp_path / "two").q
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5 * one.abs().max().item())
