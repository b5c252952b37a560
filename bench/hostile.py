"""Hostile-user cases through the `layerif` CLI on a tiny random model in a scratch folder.

Every case sets up a scratch folder (user files, links, earlier runs), runs one command in-process, and
records the exit code, whether stderr is one line, and how many bytes of user data were lost (changed or
removed; must be 0 everywhere). Writes bench/results/hostile.md.

    python bench/hostile.py [--work /tmp/layerif-hostile]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(flag, "1")


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Path], tuple[list[str], list[Path]]]  # (shared root, case folder) -> (argv, user paths)
    expect: int = 2


def files_under(paths: list[Path]) -> dict[str, bytes | str]:
    """Bytes of every file (and target of every link) under the given user paths, links not followed."""
    state: dict[str, bytes | str] = {}
    for top in paths:
        entries = [top] if not top.is_dir() or top.is_symlink() else [top, *top.rglob("*")]
        for entry in entries:
            if entry.is_symlink():
                state[str(entry)] = "link:" + os.readlink(entry)
            elif entry.is_file():
                state[str(entry)] = entry.read_bytes()
    return state


def bytes_lost(before: dict[str, bytes | str], after: dict[str, bytes | str]) -> int:
    return sum(len(value) for key, value in before.items() if after.get(key) != value)


def run(argv: list[str]) -> tuple[int, str]:
    from layerif.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


# ---- the shared inputs ----
def prepare(root: Path) -> None:
    import torch

    from layerif.scores import LayerScores
    from tests.conftest import tiny_texts
    from tests.helpers import instruction_rows, save_tiny_model, write_jsonl

    save_tiny_model(root / "model", layers=3)
    write_jsonl(root / "train.jsonl", instruction_rows(12, seed=1))
    write_jsonl(root / "val.jsonl", instruction_rows(4, seed=2))
    (root / "calib.txt").write_text("\n".join(tiny_texts(200, seed=4)))
    q = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    LayerScores(q=q, module_names=names, q_modules=q.unsqueeze(1).repeat(1, 7, 1) / 7, n_params=[15360] * 3,
                n_val=4).save(root / "scores")
    code, err = run(moe_train(root, root / "adapter"))
    assert code == 0, err


def score(root: Path, out: Path, *extra: str) -> list[str]:
    return ["score", "--model", str(root / "model"), "--train", str(root / "train.jsonl"), "--val",
            str(root / "val.jsonl"), "--n-train", "12", "--n-val", "4", "--out", str(out), "--quiet", *extra]


def prune(root: Path, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["prune", "--model", str(model or root / "model"), "--method", "wanda", "--sparsity", "0.5", "--calib",
            str(root / "calib.txt"), "--calib-sequences", "4", "--calib-length", "16", "--out", str(out), "--quiet",
            *extra]


def moe_train(root: Path, out: Path, *extra: str) -> list[str]:
    return ["moe", "train", "--model", str(root / "model"), "--train", str(root / "train.jsonl"), "--allocation",
            "uniform", "--budget", "6", "--epochs", "1", "--batch-size", "4", "--micro-batch-size", "2", "--out",
            str(out), "--quiet", *extra]


def evaluate(root: Path, model: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--ppl", str(root / "calib.txt"), "--ppl-length", "16",
            "--ppl-windows", "2", "--quiet", *extra]


def with_args(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


# ---- case set-ups: each returns the command and the user paths to protect ----
def user_dir(case: Path, name: str = "D") -> Path:
    folder = case / name
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "ro.txt").write_text("read-only\n")
    (folder / "ro.txt").chmod(0o444)
    return folder


def model_copy(root: Path, case: Path) -> Path:
    return Path(shutil.copytree(root / "model", case / "model"))


def s_user_checkpoint(overwrite: bool):
    def setup(root, case):
        out = case / "D"
        (out / ".checkpoint").mkdir(parents=True)
        (out / ".checkpoint" / "notes.txt").write_text("x" * 100)
        return score(root, out, *(["--overwrite"] if overwrite else [])), [out]
    return setup


def s_symlink_checkpoint(root, case):
    target = case / "elsewhere"
    target.mkdir()
    (target / "manifest.json").write_text('{"mine": true}\n')
    out = case / "D"
    out.mkdir()
    (out / ".checkpoint").symlink_to(target)
    return score(root, out, "--overwrite"), [out, target]


def s_prune_into_model(where: str):
    def setup(root, case):
        model = model_copy(root, case)
        out = {"same": model, "inside": model / "sub", "parent": case}[where]
        return prune(root, out, "--save-model", "--overwrite", model=model), [case]
    return setup


def s_moe_user_train_json(root, case):
    out = user_dir(case)
    (out / "train.json").write_text('{"mine": 1}\n')
    return moe_train(root, out, "--overwrite"), [out]


def s_into_user_folder(command: str, overwrite: bool):
    def setup(root, case):
        out = user_dir(case)
        (out / "link").symlink_to(root / "calib.txt")
        argv = {"score": score(root, out), "prune": prune(root, out, "--save-model"), "moe": moe_train(root, out),
                "evaluate": evaluate(root, root / "model", "--out", str(out)),
                "experts": ["allocate", "experts", "--scores", str(root / "scores"), "--budget", "6", "--out",
                            str(out)],
                "sparsity": ["allocate", "sparsity", "--scores", str(root / "scores"), "--sparsity", "0.5",
                             "--out", str(out), "--quiet"]}[command]
        return argv + (["--overwrite"] if overwrite else []), [out, root / "calib.txt"]
    return setup


def s_clash(command: str):
    def setup(root, case):
        out = user_dir(case)
        name = {"score": "run.json", "prune": "ratios.json", "moe": "experts.json"}[command]
        (out / name).write_text('{"user": true}\n')
        argv = {"score": score(root, out), "prune": prune(root, out), "moe": moe_train(root, out)}[command]
        return argv + ["--overwrite"], [out]
    return setup


def s_rerun_overwrite(root, case):
    out = case / "run"
    code, err = run(score(root, out))
    assert code == 0, err
    (out / "mine.txt").write_text("added by the user after the run\n")
    return score(root, out, "--overwrite", "--estimator", "identity"), [out / "mine.txt"]


def s_rerun_without_overwrite(root, case):
    out = case / "run"
    code, err = run(score(root, out))
    assert code == 0, err
    return score(root, out), [out]  # refused: the whole earlier run must survive


def s_publish_failure(root, case):
    out = case / "run"
    code, err = run(score(root, out))
    assert code == 0, err
    (out / "mine.txt").write_text("user file beside a run\n")
    import layerif.report.plots as plots

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    case_state["restore"] = (plots, plots.plot_layer_scores)
    plots.plot_layer_scores = no_space
    return score(root, out, "--overwrite"), [out]


def s_locked(root, case):
    out = case / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(case / '.run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    case_state["kill"] = holder
    return score(root, out), [case / ".run.lock"]


def s_stale_lock(root, case):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (case / ".run.lock").write_text(f"{dead.pid}\n")
    return score(root, case / "run"), []


def s_simple(build: Callable[[Path, Path], list[str]]):
    def setup(root, case):
        return build(root, case), []
    return setup


def s_out_link_to_user_dir(root, case):
    target = user_dir(case, "real")
    (case / "link").symlink_to(target)
    return score(root, case / "link", "--overwrite"), [target, case / "link"]


def s_dangling_out(root, case):
    (case / "link").symlink_to(case / "nowhere")
    return score(root, case / "link"), [case / "link"]


def s_out_file(build: Callable[[Path, Path], list[str]]):
    def setup(root, case):
        (case / "file").write_text("user file\n")
        return build(root, case / "file"), [case / "file"]
    return setup


def s_truncated(root, case):
    model = model_copy(root, case)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return evaluate(root, model), [model]


def s_mismatch(root, case):
    model = model_copy(root, case)
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 48
    (model / "config.json").write_text(json.dumps(config))
    return evaluate(root, model), [model]


def s_broken_jsonl(root, case):
    bad = case / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "tab\there"}\n')
    return with_args(score(root, case / "run"), "--train", str(bad)), [bad]


def s_user_eval_json(root, case):
    model = model_copy(root, case)
    (model / "eval.json").write_text('{"user": "my own results"}\n')
    return evaluate(root, model), [model]


def s_moe_eval_out_folder(root, case):
    folder = user_dir(case)
    return ["moe", "evaluate", "--adapter", str(root / "adapter"), "--test", str(root / "val.jsonl"), "--out",
            str(folder), "--quiet"], [folder]


case_state: dict = {}

CASES = [
    Case("score: user .checkpoint folder in --out", s_user_checkpoint(False)),
    Case("score --overwrite: user .checkpoint folder in --out", s_user_checkpoint(True)),
    Case("score --overwrite: .checkpoint is a symlink to a user folder", s_symlink_checkpoint),
    Case("prune --save-model --out = the model folder", s_prune_into_model("same")),
    Case("prune --save-model --out inside the model folder", s_prune_into_model("inside")),
    Case("prune --save-model --out = the folder holding the model", s_prune_into_model("parent")),
    Case("moe train --overwrite: user's train.json in --out", s_moe_user_train_json),
    Case("score into a folder of user files", s_into_user_folder("score", False)),
    Case("prune into a folder of user files", s_into_user_folder("prune", False)),
    Case("moe train into a folder of user files", s_into_user_folder("moe", False)),
    Case("evaluate --out a folder of user files", s_into_user_folder("evaluate", False)),
    Case("allocate experts --out a folder of user files", s_into_user_folder("experts", False)),
    Case("allocate sparsity --out a folder of user files", s_into_user_folder("sparsity", False)),
    Case("score --overwrite into a folder of user files (kept)", s_into_user_folder("score", True), 0),
    Case("prune --overwrite into a folder of user files (kept)", s_into_user_folder("prune", True), 0),
    Case("moe train --overwrite into a folder of user files (kept)", s_into_user_folder("moe", True), 0),
    Case("evaluate --overwrite into a folder of user files (kept)", s_into_user_folder("evaluate", True), 0),
    Case("allocate experts --overwrite into user files (kept)", s_into_user_folder("experts", True), 0),
    Case("allocate sparsity --overwrite into user files (kept)", s_into_user_folder("sparsity", True), 0),
    Case("score --overwrite: user's own run.json in --out", s_clash("score")),
    Case("prune --overwrite: user's own ratios.json in --out", s_clash("prune")),
    Case("moe train --overwrite: user's own experts.json in --out", s_clash("moe")),
    Case("evaluate: user's own eval.json in the model folder", s_user_eval_json),
    Case("score --overwrite on our earlier run + a user file", s_rerun_overwrite, 0),
    Case("score again without --overwrite on our earlier run", s_rerun_without_overwrite),
    Case("score --overwrite: publishing fails (disk full)", s_publish_failure, 1),
    Case("score while another command holds --out", s_locked),
    Case("score with a stale lock of a dead pid", s_stale_lock, 0),
    Case("score --overwrite --out is a symlink to a user folder", s_out_link_to_user_dir),
    Case("score --out is a dangling symlink", s_dangling_out),
    Case("score --out is an existing file", s_out_file(lambda root, out: score(root, out))),
    Case("allocate experts --out is an existing file", s_out_file(
        lambda root, out: ["allocate", "experts", "--scores", str(root / "scores"), "--budget", "6", "--out",
                           str(out)])),
    Case("allocate sparsity --out is an existing file", s_out_file(
        lambda root, out: ["allocate", "sparsity", "--scores", str(root / "scores"), "--sparsity", "0.5", "--out",
                           str(out)])),
    Case("moe evaluate --out is an existing folder", s_moe_eval_out_folder),
    Case("score --strategy spill --spill-dir is a file", s_out_file(
        lambda root, out: score(root, out.parent / "run", "--strategy", "spill", "--spill-dir", str(out)))),
    Case("evaluate a truncated model.safetensors", s_truncated),
    Case("evaluate a config whose sizes do not match the weights", s_mismatch),
    Case("score: broken JSONL line", s_broken_jsonl),
    Case("score --device tpu", s_simple(lambda root, case: score(root, case / "run", "--device", "tpu"))),
    Case("score --device cuda (no CUDA here)", s_simple(lambda root, case: score(root, case / "run", "--device",
                                                                                 "cuda"))),
    Case("score --sample-seed -1", s_simple(lambda root, case: score(root, case / "run", "--sample-seed", "-1"))),
    Case("score --params lora --lora-rank 0", s_simple(
        lambda root, case: score(root, case / "run", "--params", "lora", "--lora-rank", "0"))),
    Case("score --params lora --finetune-epochs -1", s_simple(
        lambda root, case: score(root, case / "run", "--params", "lora", "--finetune-epochs", "-1"))),
    Case("score --n-train 0", s_simple(lambda root, case: score(root, case / "run", "--n-train", "0"))),
    Case("score --batch-size 0", s_simple(lambda root, case: score(root, case / "run", "--batch-size", "0"))),
    Case("score --max-memory lots", s_simple(lambda root, case: score(root, case / "run", "--max-memory", "lots"))),
    Case("score --max-memory 1KB (runs, with a warning)", s_simple(
        lambda root, case: score(root, case / "run", "--max-memory", "1KB")), 0),
    Case("score --estimator lissa", s_simple(lambda root, case: score(root, case / "run", "--estimator", "lissa"))),
    Case("score --dtype float8", s_simple(lambda root, case: score(root, case / "run", "--dtype", "float8"))),
    Case("score --train missing.jsonl", s_simple(
        lambda root, case: with_args(score(root, case / "run"), "--train", str(case / "missing.jsonl")))),
    Case("score --model hub id not cached, offline", s_simple(
        lambda root, case: with_args(score(root, case / "run"), "--model", "no-such-org/no-such-model"))),
    Case("prune --sparsity 1.5", s_simple(lambda root, case: with_args(prune(root, case / "p"), "--sparsity",
                                                                       "1.5"))),
    Case("prune --epsilon -1", s_simple(lambda root, case: prune(root, case / "p", "--allocation", "alphapruning",
                                                                 "--epsilon", "-1"))),
    Case("prune --calib missing.txt", s_simple(
        lambda root, case: with_args(prune(root, case / "p"), "--calib", str(case / "missing.txt")))),
    Case("prune --allocation layerif --scores not-a-run", s_simple(
        lambda root, case: prune(root, case / "p", "--allocation", "layerif", "--scores", str(case)))),
    Case("evaluate with nothing to evaluate", s_simple(
        lambda root, case: ["evaluate", "--model", str(root / "model"), "--out", str(case / "e")])),
    Case("evaluate --ppl-windows 0", s_simple(lambda root, case: evaluate(root, root / "model", "--ppl-windows",
                                                                          "0", "--out", str(case / "e")))),
    Case("evaluate --ppl-length beyond the context", s_simple(
        lambda root, case: with_args(evaluate(root, root / "model", "--out", str(case / "e")), "--ppl-length",
                                     "4096"))),
    Case("allocate experts --budget below the layer count", s_simple(
        lambda root, case: ["allocate", "experts", "--scores", str(root / "scores"), "--budget", "1"])),
    Case("moe train --lr nan", s_simple(lambda root, case: moe_train(root, case / "m", "--lr", "nan"))),
    Case("moe train --warmup -5", s_simple(lambda root, case: moe_train(root, case / "m", "--warmup", "-5"))),
    Case("moe train --modules ffn", s_simple(lambda root, case: moe_train(root, case / "m", "--modules", "ffn"))),
    Case("moe evaluate --adapter without an adapter", s_simple(
        lambda root, case: ["moe", "evaluate", "--adapter", str(case), "--test", str(root / "val.jsonl")])),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/layerif-hostile")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "hostile.md"))
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    root = work / "shared"
    root.mkdir(parents=True)
    started = time.perf_counter()
    prepare(root)
    shared_inputs = [root / name for name in ("model", "train.jsonl", "val.jsonl", "calib.txt", "scores", "adapter")]
    rows = []
    for number, case in enumerate(CASES, 1):
        folder = work / f"case{number:02d}"
        folder.mkdir()
        case_state.clear()
        argv, user_paths = case.setup(root, folder)
        before = files_under(user_paths + shared_inputs)
        clock = time.perf_counter()
        try:
            code, err = run(argv)
        finally:
            if "restore" in case_state:
                module, original = case_state["restore"]
                module.plot_layer_scores = original
            if "kill" in case_state:
                case_state["kill"].kill()
                case_state["kill"].wait()
        seconds = time.perf_counter() - clock
        lost = bytes_lost(before, files_under(user_paths + shared_inputs))
        lines = [line for line in err.strip().splitlines() if line.strip()]
        rows.append({"case": case.name, "exit": code, "expected": case.expect, "one_line": len(lines) <= 1,
                     "lost": lost, "seconds": seconds, "message": lines[-1] if lines else ""})
        print(f"{number:2d} exit {code} (want {case.expect}) lost {lost} B  {case.name}", file=sys.stderr)
    total = time.perf_counter() - started
    bad = [row for row in rows if row["lost"] or row["exit"] != row["expected"] or not row["one_line"]]
    lines = [
        "# Hostile inputs through the CLI",
        "",
        f"{len(rows)} cases on a tiny random Llama (3 blocks) in a scratch folder, run in-process by "
        "`python bench/hostile.py`; every case protects the user files it sets up and the shared inputs "
        "(model folder, data, scores, adapter). Bytes lost = bytes of those files changed or removed.",
        "",
        f"Result: {len(rows) - len(bad)}/{len(rows)} as expected; bytes of user data lost in total: "
        f"{sum(row['lost'] for row in rows)}. Wall time {total:.0f} s (machine shared with other jobs, so "
        "times are indicative only; running as uid "
        f"{os.geteuid()}{', where read-only folders do not stop writes, so the read-only --out cases of tests/test_safety.py run only for a normal user' if os.geteuid() == 0 else ''}).",
        "",
        "| # | case | exit | expected | one line | bytes lost | s | stderr (last line) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, row in enumerate(rows, 1):
        message = row["message"].replace("|", "\\|").replace(str(work), "…")
        if len(message) > 140:
            message = message[:137] + "..."
        lines.append(f"| {number} | {row['case']} | {row['exit']} | {row['expected']} | "
                     f"{'yes' if row['one_line'] else 'no'} | {row['lost']} | {row['seconds']:.1f} | {message} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(bad)} unexpected", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
