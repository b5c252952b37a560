"""Hostile-user cases through the `layerif` CLI on a tiny random model in a scratch folder.

Every case prepares a scratch folder (user files, links, earlier runs, damaged or untrusted model files, or an
I/O fault at the n-th write / fsync / rename), runs one command in-process, and records the exit code, whether
stderr is one line, and how many bytes of user data were lost (changed or removed; must be 0 everywhere).
Cases are rows of the table CASES: (name, expected exit, preparation, command). Writes bench/results/hostile.md.

    python bench/hostile.py [--work /tmp/layerif-hostile]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(flag, "1")
import layerif.report.plots as plots  # noqa: E402 - after the offline switches
from tests.faults import BAD_MODEL_FILES, Faults, plant_pickle  # noqa: E402


def files_under(paths: list[Path]) -> dict[str, bytes | str]:
    """Bytes of every file (and target of every link) under the given user paths, links not followed."""
    state: dict[str, bytes | str] = {}
    for top in paths:
        for entry in [top] if not top.is_dir() or top.is_symlink() else [top, *top.rglob("*")]:
            if entry.is_symlink():
                state[str(entry)] = "link:" + os.readlink(entry)
            elif entry.is_file():
                state[str(entry)] = entry.read_bytes()
    return state


def run(argv: list[str]) -> tuple[int, str]:
    from layerif.cli import main

    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


# ---- commands, as templates: {r} is the shared root, {c} the case folder (a repeated option: the last wins) ----
BASE = {
    "score": "score --model {r}/model --train {r}/train.jsonl --val {r}/val.jsonl --n-train 12 --n-val 4 --quiet "
             "--out",
    "prune": "prune --model {r}/model --method wanda --sparsity 0.5 --calib {r}/calib.txt --calib-sequences 4 "
             "--calib-length 16 --quiet --out",
    "moe": "moe train --model {r}/model --train {r}/train.jsonl --allocation uniform --budget 6 --epochs 1 "
           "--batch-size 4 --micro-batch-size 2 --quiet --out",
    "eval": "evaluate --ppl {r}/calib.txt --ppl-length 16 --ppl-windows 2 --quiet --model",
    "experts": "allocate experts --scores {r}/scores --budget 6",
    "sparsity": "allocate sparsity --scores {r}/scores --sparsity 0.5 --quiet",
}
INTO = {"score": "{score} {c}/D", "prune": "{prune} {c}/D --save-model", "moe": "{moe} {c}/D",
        "evaluate": "{eval} {r}/model --out {c}/D", "experts": "{experts} --out {c}/D",
        "sparsity": "{sparsity} --out {c}/D"}
FAULTY = {"score-store": "{score} {c}/out --strategy store --max-memory 1MiB --overwrite",
          "score-spill": "{score} {c}/out --strategy spill --overwrite",
          "allocate-sparsity": "{sparsity} --out {c}/out --overwrite",
          "prune-save-model": "{prune} {c}/out --save-model --overwrite", "moe-train": "{moe} {c}/out --overwrite"}


def argv(template: str, r: Path, c: Path) -> list[str]:
    """A case's command line from its template: the BASE commands first, then the folders."""
    return shlex.split(template.format_map({**BASE, "r": "{r}", "c": "{c}"}).format(r=r, c=c))


# ---- preparations: files and links each kind of case lays out, and which of them must survive ----
LAYOUTS = {  # kind -> (files, links, protected paths); D/ro.txt is made read-only
    "none": ({"bad.jsonl": '{"text": "fine"}\n{"text": "tab\there"}\n'}, {}, ["bad.jsonl"]),
    "user-ckpt": ({"D/.checkpoint/notes.txt": "x" * 100}, {}, ["D"]),
    "link-ckpt": ({"elsewhere/manifest.json": '{"mine": true}\n'}, {"D/.checkpoint": "elsewhere"},
                  ["D", "elsewhere"]),
    "user-dir": ({"D/notes.txt": "my notes\n", "D/ro.txt": "read-only\n"}, {"D/link": "{r}/calib.txt"}, ["D", "{r}/calib.txt"]),
    "link-out": ({"real/notes.txt": "my notes\n"}, {"link": "real"}, ["real", "link"]),
    "dangling": ({}, {"link": "nowhere"}, ["link"]),
    "file": ({"file": "user file\n"}, {}, ["file"]),
}


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def setup(kind, r, c, arg):
    """Prepare case folder `c` for one kind of case; return the paths whose bytes must survive."""
    if kind in LAYOUTS:
        files, links, protected = LAYOUTS[kind]
        for name, text in {**files, **({f"D/{arg}": '{"user": true}\n'} if arg else {})}.items():
            (c / name).parent.mkdir(parents=True, exist_ok=True)
            (c / name).write_text(text)
        for name, target in links.items():
            (c / name).parent.mkdir(parents=True, exist_ok=True)
            (c / name).symlink_to(c / target.format(r=r))  # an absolute target stays absolute
        if (c / "D/ro.txt").exists():
            (c / "D/ro.txt").chmod(0o444)
        return [c / path.format(r=r) for path in protected]
    if kind in ("earlier-run", "publish-fails"):
        assert run(argv("{score} {c}/run", r, c))[0] == 0
        if arg or kind == "publish-fails":
            (c / "run" / "mine.txt").write_text("added by the user after the run\n")
        if kind == "publish-fails":  # the plot fails inside the plotting library, not through layerif.io
            state["patch"].setattr(plots, "plot_layer_scores", _no_space)
        return [c / "run"] if not arg else [c / "run" / "mine.txt"]
    if kind == "locked":
        state["kill"] = holder = subprocess.Popen([sys.executable, "-c", (
            f"import fcntl, os, time\nfd = os.open({str(c / '.run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
        return [c / ".run.lock"]
    if kind == "stale-lock":
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (c / ".run.lock").write_text(f"{dead.pid}\n")
        return []
    if kind == "fault":
        command, code, which = arg
        shutil.copytree(r / "previous" / command, c / "out")
        total = state["totals"][command]
        Faults({"first": 1, "middle": (total + 1) // 2, "last": total}[which], code).install(state["patch"])
        return [c / "out"]
    model = Path(shutil.copytree(r / "model", c / "model"))  # kind == "model": a copy, damaged as `arg` says
    if arg in BAD_MODEL_FILES:
        (model / BAD_MODEL_FILES[arg][0]).write_bytes(BAD_MODEL_FILES[arg][1])
    elif arg is not None:
        DAMAGE[arg](model, model / "model.safetensors", c)
    return [c]


DAMAGE = {
    "truncated": lambda model, weights, c: weights.write_bytes(weights.read_bytes()[:1000]),
    "mismatch": lambda model, weights, c: edit_json(model / "config.json", hidden_size=48),
    "eval.json": lambda model, weights, c: (model / "eval.json").write_text('{"user": "my own results"}\n'),
    "remote code": lambda model, weights, c: (
        (model / "modeling_x.py").write_text(f"open({str(c / 'code-ran')!r}, 'w').close()\n"),
        edit_json(model / "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.X"})),
    "pickle only": lambda model, weights, c: (
        weights.unlink(), plant_pickle(model / "pytorch_model.bin", c / "code-ran")),
    "symlink out": lambda model, weights, c: (
        weights.rename(c / "elsewhere.safetensors"), weights.symlink_to(c / "elsewhere.safetensors")),
}


def _no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


state: dict = {}
SCORE_BAD = [(2, "--device tpu"), (2, "--device cuda"), (2, "--sample-seed -1"), (2, "--params lora --lora-rank 0"),
             (2, "--params lora --finetune-epochs -1"), (2, "--n-train 0"), (2, "--batch-size 0"),
             (2, "--max-memory lots"), (0, "--max-memory 1KB"), (2, "--estimator newton"), (2, "--dtype float8"),
             (2, "--strategy disk"), (2, "--on-nonfinite ignore"), (2, "--bootstrap -1"),
             (2, "--train {c}/missing.jsonl"), (2, "--model no-such-org/no-such-model"), (2, "--train {c}/bad.jsonl")]
CASES = [  # (name, expected exit, preparation, its argument, command template)
    ("score: user .checkpoint folder in --out", 2, "user-ckpt", None, "{score} {c}/D"),
    ("score --overwrite: user .checkpoint folder in --out", 2, "user-ckpt", None, "{score} {c}/D --overwrite"),
    ("score --overwrite: .checkpoint links to a user folder", 2, "link-ckpt", None, "{score} {c}/D --overwrite"),
    *[(f"prune --save-model --out {where}", 2, "model", None, f"{{prune}} {out} --model {{c}}/model --save-model "
       "--overwrite") for where, out in (("= the model folder", "{c}/model"), ("inside the model folder",
                                                                              "{c}/model/sub"), ("= its parent", "{c}"))],
    ("moe train --overwrite: user's train.json in --out", 2, "user-dir", "train.json", "{moe} {c}/D --overwrite"),
    *[(f"{name} into a folder of user files", 2, "user-dir", None, template) for name, template in INTO.items()],
    *[(f"{name} --overwrite into a folder of user files (kept)", 0, "user-dir", None, template + " --overwrite")
      for name, template in INTO.items()],
    *[(f"{name} --overwrite: user's own {file} in --out", 2, "user-dir", file, INTO[name] + " --overwrite")
      for name, file in (("score", "run.json"), ("prune", "ratios.json"), ("moe", "experts.json"))],
    ("evaluate: user's own eval.json in the model folder", 2, "model", "eval.json", "{eval} {c}/model"),
    ("score --overwrite on our earlier run + a user file", 0, "earlier-run", "mine", "{score} {c}/run --overwrite"),
    ("score again without --overwrite on our earlier run", 2, "earlier-run", None, "{score} {c}/run"),
    ("score --overwrite: the plot fails (full disk)", 1, "publish-fails", None, "{score} {c}/run --overwrite"),
    ("score while another command holds --out", 2, "locked", None, "{score} {c}/run"),
    ("score with a stale lock of a dead pid", 0, "stale-lock", None, "{score} {c}/run"),
    ("score --overwrite --out links to a user folder", 2, "link-out", None, "{score} {c}/link --overwrite"),
    ("score --out is a dangling symlink", 2, "dangling", None, "{score} {c}/link"),
    ("score --out is an existing file", 2, "file", None, "{score} {c}/file"),
    ("allocate experts --out is an existing file", 2, "file", None, "{experts} --out {c}/file"),
    ("allocate sparsity --out is an existing file", 2, "file", None, "{sparsity} --out {c}/file"),
    ("moe evaluate --out a folder", 2, "user-dir", None, "moe evaluate --adapter {r}/adapter --test {r}/val.jsonl "
     "--out {c}/D --quiet"),
    ("score --spill-dir is a file", 2, "file", None, "{score} {c}/run --strategy spill --spill-dir {c}/file"),
    ("evaluate a truncated model.safetensors", 2, "model", "truncated", "{eval} {c}/model"),
    ("evaluate a config whose sizes do not match the weights", 2, "model", "mismatch", "{eval} {c}/model"),
    *[(f"score {extra.replace('{c}/', '')}", code, "none", None, "{score} {c}/run " + extra) for code, extra in SCORE_BAD],
    *[(f"prune {extra.replace('{c}/', '')}", 2, "none", None, "{prune} {c}/p " + extra) for extra in (
        "--sparsity 1.5", "--allocation alphapruning --epsilon -1", "--calib {c}/none.txt", "--method obs",
        "--allocation layerif --scores {c}", "--calib-sequences 0")],
    ("evaluate with nothing to evaluate", 2, "none", None, "evaluate --model {r}/model --out {c}/e"),
    ("evaluate --ppl-windows 0", 2, "none", None, "{eval} {r}/model --ppl-windows 0 --out {c}/e"),
    ("evaluate --ppl-length 4096 (beyond the context)", 2, "none", None, "{eval} {r}/model --ppl-length 4096"),
    ("allocate experts --budget below the layer count", 2, "none", None, "{experts} --budget 1"),
    *[(f"moe train {extra}", 2, "none", None, "{moe} {c}/m " + extra) for extra in ("--lr nan", "--warmup -5",
                                                                                     "--modules ffn", "--rank 0")],
    ("moe evaluate --adapter not an adapter", 2, "none", None, "moe evaluate --adapter {c} --test {r}/val.jsonl"),
    *[(f"untrusted model: {how}", 2, "model", how, "{eval} {c}/model" + ("/x.gguf" if file.endswith(".gguf")
                                                                          else "")) for how, (file, _) in BAD_MODEL_FILES.items()],
    *[(f"untrusted model: {how} ({command.split()[0][1:-1]})", 2, "model", how, command) for how, command in (
        ("remote code", "{score} {c}/run --model {c}/model"), ("remote code", "{eval} {c}/model"),
        ("remote code", "{moe} {c}/m --model {c}/model"), ("pickle only", "{eval} {c}/model"),
        ("symlink out", "{eval} {c}/model"))],
    *[(f"fault: {name}, {which} write/fsync/rename fails with {errno.errorcode[code]}", 2 if code == errno.ENOSPC
       else 1, "fault", (name, code, which), template) for name, template in FAULTY.items()
      for code in (errno.ENOSPC, errno.EIO) for which in ("first", "middle", "last")],
]


def prepare(root: Path) -> None:
    """The shared inputs, one earlier run of every faulty command, and how many I/O calls each makes."""
    import pytest

    from tests.conftest import tiny_texts
    from tests.helpers import instruction_rows, save_tiny_model, write_jsonl

    save_tiny_model(root / "model", layers=3)
    write_jsonl(root / "train.jsonl", instruction_rows(12, seed=1))
    write_jsonl(root / "val.jsonl", instruction_rows(4, seed=2))
    (root / "calib.txt").write_text("\n".join(tiny_texts(200, seed=4)))
    earlier = [("{score} {c}", "scores"), ("{moe} {c}", "adapter"), *[(t, f"previous/{n}") for n, t in FAULTY.items()]]
    for command, folder in earlier:
        code, err = run(argv(command.replace("{c}/out", "{c}"), root, root / folder))
        assert code == 0, err
    state["totals"] = {}
    for name, template in FAULTY.items():
        shutil.copytree(root / "previous" / name, root / "count" / name / "out")
        with pytest.MonkeyPatch.context() as patch:
            faults = Faults().install(patch)
            assert run(argv(template, root, root / "count" / name))[0] == 0
        state["totals"][name] = len(faults.calls)


def main() -> int:
    import pytest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/layerif-hostile")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "hostile.md"))
    args = parser.parse_args()
    work, started, rows = Path(args.work), time.perf_counter(), []
    shutil.rmtree(work, ignore_errors=True)
    (work / "shared").mkdir(parents=True)
    prepare(root := work / "shared")
    shared = [root / name for name in ("model", "train.jsonl", "val.jsonl", "calib.txt", "scores", "adapter")]
    for number, (name, expect, kind, argument, template) in enumerate(CASES, 1):
        (folder := work / f"case{number:03d}").mkdir()
        with pytest.MonkeyPatch.context() as patch:
            state.update(patch=patch, kill=None)
            user = setup(kind, root, folder, argument)
            command, before, clock = argv(template, root, folder), files_under(user + shared), time.perf_counter()
            try:
                code, err = run(command)
            finally:
                if state["kill"] is not None:
                    state["kill"].kill()
                    state["kill"].wait()
        after, seconds = files_under(user + shared), time.perf_counter() - clock
        lost = sum(len(value) for key, value in before.items() if after.get(key) != value)
        lost += int((folder / "code-ran").exists())  # code or a pickle from a model ran: counted as a loss
        lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("warning:")]
        rows.append((name, code, expect, len(lines) <= 1, lost, seconds, lines[-1] if lines else ""))
        print(f"{number:3d} exit {code} (want {expect}) lost {lost} B  {name}", file=sys.stderr)
    bad = [row for row in rows if row[4] or row[1] != row[2] or not row[3]]
    lines = ["# Hostile inputs through the CLI", "", f"{len(rows)} cases on a tiny random Llama (3 blocks), run "
             "in-process by `python bench/hostile.py`; each protects the user files it sets up, the shared inputs "
             "(model, data, scores, adapter) and, for a `fault:` case (the first, middle or last write / fsync / "
             "rename of the command fails, through tests/faults.py), the earlier run it overwrites. Bytes lost = "
             "bytes of those files changed or removed, plus 1 if code or a pickle from a model folder ran.", "",
             f"Result: {len(rows) - len(bad)}/{len(rows)} as expected; bytes of user data lost in total: "
             f"{sum(row[4] for row in rows)}. Wall time {time.perf_counter() - started:.0f} s (machine shared with "
             f"other jobs; times are indicative only; uid {os.geteuid()}).", "",
             "| # | case | exit | expected | one line | bytes lost | s | stderr (last line) |", "|---|---|---|---|---|---|---|---|"]
    for number, (name, code, expect, one_line, lost, seconds, message) in enumerate(rows, 1):
        message = message.replace("|", "\\|").replace(str(work), "…")
        message = message if len(message) <= 140 else message[:137] + "..."
        lines.append(f"| {number} | {name} | {code} | {expect} | {'yes' if one_line else 'no'} | {lost} | "
                     f"{seconds:.1f} | {message} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(bad)} unexpected", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
