"""`layerif allocate experts`, `layerif moe train`, `layerif moe evaluate` end to end on a tiny local model."""

from __future__ import annotations

import json

import pytest
import torch

from layerif.cli import main
from layerif.scores import LayerScores
from tests.moe.tiny import save_tiny, task_rows, tiny_gpt2, tiny_llama


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _scores(directory, n_layers=4, seed=0):
    q = torch.randn(n_layers, 20, generator=torch.Generator().manual_seed(seed))
    q[-1] += 2.0  # the last layer clearly scores highest
    LayerScores(q=q, module_names=["self_attn.q_proj"], q_modules=q[:, None, :].clone(), n_params=[10] * n_layers,
                n_val=5).save(directory)
    return directory


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_allocate_experts_command(tmp_path, capsys):
    scores = _scores(tmp_path / "scores")
    code, out, _ = _run(["allocate", "experts", "--scores", str(scores), "--budget", "12", "--beta", "2.5"], capsys)
    assert code in (0, None)
    counts = [int(c) for c in out.splitlines()[0].split(":")[1].split(",")]
    assert sum(counts) == 12 and min(counts) >= 1 and counts[-1] == max(counts)
    code, out, _ = _run(["allocate", "experts", "--scores", str(scores), "--budget", "12", "--score", "S_top25",
                         "--out", str(tmp_path / "alloc")], capsys)
    data = json.loads((tmp_path / "alloc" / "experts.json").read_text())
    assert sum(data["counts"]) == 12 and len(data["top_k"]) == 4 and len(data["scores"]) == 4
    assert data["arguments"]["score"] == "S_top25"
    code, out, _ = _run(["allocate", "experts", "--scores", str(scores), "--budget", "12", "--allocation",
                         "mola-8642"], capsys)
    assert out.splitlines()[0] == "counts: 5,4,2,1"  # 12 · (8,6,4,2)/20 = 4.8, 3.6, 2.4, 1.2


@pytest.mark.parametrize(
    "extra,message",
    [(["--budget", "3"], "--budget"), (["--budget", "12", "--beta", "0"], "--beta"),
     (["--budget", "12", "--top-k", "9"], "--top-k"), (["--budget", "12", "--score", "S_max"], "S_max")],
)
def test_allocate_bad_input_exits_2(tmp_path, capsys, extra, message):
    scores = _scores(tmp_path / "scores")
    code, _, err = _run(["allocate", "experts", "--scores", str(scores), *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_train_and_evaluate_commands(tmp_path, capsys):
    model_dir = save_tiny(tiny_llama(), tmp_path / "model")
    capsys.readouterr()
    train = _write_rows(tmp_path / "train.jsonl", task_rows(12, seed=0))
    test = _write_rows(tmp_path / "test.jsonl", task_rows(6, seed=1))
    scores = _scores(tmp_path / "scores")
    adapter = tmp_path / "adapter"
    code, out, err = _run(["moe", "train", "--model", str(model_dir), "--train", str(train), "--scores", str(scores),
                           "--budget", "10", "--beta", "2", "--epochs", "1", "--batch-size", "4",
                           "--micro-batch-size", "2", "--out", str(adapter), "--quiet"], capsys)
    assert code in (0, None), err
    for name in ("adapter.safetensors", "adapter_config.json", "experts.json", "train.json"):
        assert (adapter / name).is_file()
    assert sum(json.loads((adapter / "experts.json").read_text())["counts"]) == 10
    code, out, err = _run(["moe", "evaluate", "--adapter", str(adapter), "--test", str(test), "--method",
                           "loglik,generate", "--max-new-tokens", "4", "--quiet"], capsys)
    assert code in (0, None), err
    metrics = json.loads((adapter / "eval.json").read_text())["metrics"]
    assert metrics["loglik"]["n"] == 6 and 0 <= metrics["generate"]["accuracy"] <= 1
    assert "loglik: accuracy" in out

    # The adapter refuses another base model: exit code 2, one line.
    other = save_tiny(tiny_gpt2(layers=4), tmp_path / "other")
    capsys.readouterr()  # drop the saving progress bar
    code, _, err = _run(["moe", "evaluate", "--adapter", str(adapter), "--model", str(other), "--test", str(test),
                         "--quiet"], capsys)
    assert code == 2 and "another base model" in err and len(err.strip().splitlines()) == 1

    # Scores for another layer count.
    code, _, err = _run(["moe", "train", "--model", str(model_dir), "--train", str(train), "--scores",
                         str(_scores(tmp_path / "scores6", n_layers=6)), "--budget", "10", "--out",
                         str(tmp_path / "bad"), "--quiet"], capsys)
    assert code == 2 and "layers" in err


def test_allocate_experts_controls_command(tmp_path, capsys):
    scores = _scores(tmp_path / "scores", n_layers=6)
    counts = {}
    for allocation, extra in (("layerif", []), ("depth", []), ("random", ["--seed", "1"]),
                              ("random", ["--seed", "2"])):
        out = tmp_path / f"{allocation}{''.join(extra)}"
        code, _, _ = _run(["allocate", "experts", "--scores", str(scores), "--budget", "30", "--allocation",
                           allocation, "--out", str(out), *extra], capsys)
        assert code in (0, None)
        counts[allocation + "".join(extra)] = json.loads((out / "experts.json").read_text())["counts"]
    assert all(sum(c) == 30 and min(c) >= 1 for c in counts.values())
    assert all(b >= a for a, b in zip(counts["depth"], counts["depth"][1:])) and counts["depth"][-1] > counts["depth"][0]
    for seed in ("1", "2"):
        assert sorted(counts[f"random--seed{seed}"]) == sorted(counts["layerif"])
    assert counts["random--seed1"] != counts["random--seed2"]
