"""Every write, fsync and rename of a command can fail: the command exits 2 (full disk) or 1 (other I/O error)
with one line naming the path, the previous run's folder is intact, nothing partial is published, and the
same command then succeeds. The default run fails a sample of the calls; `-m slow` fails every one of them."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.faults import Faults, expected_exit, sample
from tests.helpers import run_cli, snapshot, write_command_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_command_inputs(tmp_path_factory.mktemp("faults"), 2, 8, 3, 60)


def command(name: str, root: Path, out: Path) -> list[str]:
    """The tiny command `name`, writing to `out` over an earlier run (--overwrite)."""
    data = ["--model", str(root / "model"), "--train", str(root / "train.jsonl")]
    return {
        "score-store": ["score", *data, "--val", str(root / "val.jsonl"), "--n-train", "8", "--n-val", "3",
                        "--strategy", "store", "--max-memory", "1", "--batch-size", "4"],
        "score-spill": ["score", *data, "--val", str(root / "val.jsonl"), "--n-train", "8", "--n-val", "3",
                        "--strategy", "spill", "--batch-size", "4"],
        "allocate-sparsity": ["allocate", "sparsity", "--scores", str(root / "scores"), "--sparsity", "0.5"],
        "prune-save-model": ["prune", "--model", str(root / "model"), "--method", "magnitude", "--sparsity", "0.5",
                             "--save-model"],
        "moe-train": ["moe", "train", *data, "--allocation", "uniform", "--budget", "4", "--epochs", "1",
                      "--batch-size", "4", "--micro-batch-size", "2"],
    }[name] + ["--out", str(out), "--overwrite", *(["--quiet"] if name != "allocate-sparsity" else [])]


COMMANDS = ["score-store", "score-spill", "allocate-sparsity", "prune-save-model", "moe-train"]


@pytest.fixture(scope="module")
def previous(inputs):
    """One finished run of every command: the folder each faulty run overwrites."""
    runs = {}
    for name in COMMANDS:
        out = inputs / "previous" / name
        assert run_cli(*command(name, inputs, out)) == 0, name
        runs[name] = out
    return runs


def faulty_run(name, inputs, previous, tmp_path, monkeypatch, fail_at, code) -> tuple[int, Faults, Path]:
    """Copy the previous run to tmp_path/<name>/out, run the command over it with the fault; undo the patches."""
    parent = tmp_path / name
    out = parent / "out"
    shutil.rmtree(parent, ignore_errors=True)
    shutil.copytree(previous[name], out, symlinks=True)
    with monkeypatch.context() as patch:
        faults = Faults(fail_at, code).install(patch)
        exit_code = run_cli(*command(name, inputs, out))
    return exit_code, faults, out


def check_cases(name, inputs, previous, tmp_path, monkeypatch, capsys, every: bool) -> int:
    code, counted, out = faulty_run(name, inputs, previous, tmp_path, monkeypatch, None, errno.ENOSPC)
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    total = len(counted.calls)
    assert total >= 3 and any(op in ("exchange", "rename") for op, _ in counted.calls)
    cases = [(n, errno.ENOSPC) for n in sample(total, every)]
    cases += [(n, errno.EIO) for n in (sample(total, every) if every else [total // 2 + 1])]
    for n, errcode in cases:
        before = snapshot(previous[name].parent)
        code, faults, out = faulty_run(name, inputs, previous, tmp_path, monkeypatch, n, errcode)
        err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:"))
        where = f"{name}: call {n}/{total} ({faults.failed}) failing with {errno.errorcode[errcode]}"
        assert faults.failed is not None and code == expected_exit(errcode), f"{where}: exit {code}, {err}"
        assert len(err.splitlines()) == 1, f"{where}: {err}"
        failed = Path(faults.failed[1])
        assert str(failed) in err or str(failed.parent) in err, f"{where}: {err}"
        assert snapshot(out) == snapshot(previous[name]), f"{where}: the previous run changed"
        assert sorted(os.listdir(out.parent)) == ["out"], f"{where}: left {os.listdir(out.parent)}"
        assert snapshot(previous[name].parent) == before
        assert run_cli(*command(name, inputs, out)) == 0, f"{where}: the rerun failed"
        capsys.readouterr()
    return total


@pytest.mark.parametrize("name", COMMANDS)
def test_sampled_write_faults(name, inputs, previous, tmp_path, monkeypatch, capsys):
    check_cases(name, inputs, previous, tmp_path, monkeypatch, capsys, every=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_every_write_fault(name, inputs, previous, tmp_path, monkeypatch, capsys):
    check_cases(name, inputs, previous, tmp_path, monkeypatch, capsys, every=True)


def test_real_full_disk(inputs, tmp_path, capsys):
    """A 64 KiB tmpfs as --out: the run fails with exit 2 and one line, and nothing is left on it."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip() or result.returncode}")
    try:
        out = mount / "run"
        args = command("score-store", inputs, out)
        assert run_cli(*args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
        assert len(err) == 1 and str(mount) in err[0] and "No space left" in err[0], err
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)
