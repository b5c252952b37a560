"""The output-folder policy every writing command follows: lock, ownership manifest, staged all-or-nothing publishing.

- While a command runs, it holds an exclusive lock (`flock`) on a sibling file `.<out>.lock` that names its pid;
  a second command on the same folder is refused. The kernel drops the lock of a dead process, so a stale lock
  file is simply taken over.
- `.layerif.json` inside the folder lists the files we wrote and which command wrote each. Everything else
  (and anything reached through a symbolic link) is the user's: a folder holding such entries is refused unless
  `--overwrite`, and even then those entries are kept; only files we wrote are ever replaced or deleted.
- Outputs are written into a temporary sibling folder and switched in by renames: when the folder holds only
  this command's earlier outputs the two folders are exchanged in one step, so a reader sees the complete old
  run or the complete new one. A rejected or failed run leaves nothing behind; only an interrupted one keeps its
  checkpoint (`.checkpoint`), which the same command then resumes from.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from layerif.checkpoint import discard_checkpoint, is_our_checkpoint
from layerif.checkpoint import has_units as checkpoint_has_units
from layerif.errors import LayerIFError
from layerif.io import exchange, rename

MANIFEST = ".layerif.json"
FORMAT = "layerif.outputs/1"
CHECKPOINT = ".checkpoint"

# What an interrupted command kept, for the CLI's one-line message (set when a folder is left on interruption).
last_interrupted: dict = {}


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.staging-{os.getpid()}"


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _real_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _is_plain_name(name: str) -> bool:
    return "/" not in name and name not in ("", ".", "..", MANIFEST, CHECKPOINT)


def read_manifest(out: Path) -> dict[str, str]:
    """Files of `out` that we wrote -> the command that wrote each ({} when there is no valid manifest of ours)."""
    path = out / MANIFEST
    if _real_file(path):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("files"), dict):
            return {str(name): str(command) for name, command in data["files"].items()
                    if _is_plain_name(str(name)) and _real_file(out / str(name))}
        return {}
    run_record = out / "run.json"  # a score run written before the manifest existed lists its outputs itself
    if _real_file(run_record):
        try:
            record = json.loads(run_record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if isinstance(record, dict) and record.get("format") == "layerif.run/1":
            return {str(name): "score" for name in record.get("outputs", [])
                    if _is_plain_name(str(name)) and _real_file(out / str(name))}
    return {}


def _write_manifest(folder: Path, files: dict[str, str]) -> None:
    from layerif.io import atomic_write_json

    atomic_write_json(folder / MANIFEST, {"format": FORMAT, "files": dict(sorted(files.items()))})


def checkpoint_is_ours(path: Path) -> bool:
    """True when `path` is a real folder that is empty or holds a checkpoint manifest we wrote."""
    if not _real_dir(path):
        return False
    return not any(path.iterdir()) or is_our_checkpoint(path)


def _remove_ours(folder: Path, names: Iterable[str]) -> None:
    """Delete the listed entries of `folder` that are plain files, and our checkpoint (never through a link)."""
    for name in names:
        entry = folder / name
        if entry.is_symlink() or not entry.exists():
            continue
        if entry.is_dir():
            if name == CHECKPOINT:
                discard_checkpoint(entry)
            continue  # we write no other folders: one here is not ours
        entry.unlink()


def _model_path(source: str | Path | None) -> Path | None:
    """The resolved local model folder or model file behind a --model argument (None for hub ids)."""
    if source is None:
        return None
    path = Path(source).expanduser()
    return path.resolve() if path.is_dir() or path.is_file() else None


class OutputFolder:
    """One command's output folder under the policy; use `check()` early, then `with folder:` around the work."""

    def __init__(self, out: str | Path, command: str, *, overwrite: bool = False,
                 inputs: Iterable[str | Path | None] = (), names: Iterable[str] = (), shared: bool = False,
                 checkpoint: bool = False, flag: str = "--out"):
        self.out = Path(out).expanduser()
        self.command = command
        self.overwrite = overwrite
        self.inputs = [path for path in map(_model_path, inputs) if path is not None]
        self.names = list(names)
        self.shared = shared  # the folder may hold other files (a model folder, a scores folder): we add ours beside
        self.uses_checkpoint = checkpoint
        self.flag = flag
        self.staging: Path | None = None
        self._lock_fd: int | None = None
        self._created: list[Path] = []
        self._checkpoint_existed = False
        self._out_existed = True
        self.published = False

    # ---- checks (no side effects) ----
    @property
    def checkpoint_dir(self) -> Path:
        """Where a resumable command keeps finished work while it runs."""
        return self.out / CHECKPOINT

    def check(self) -> None:
        """Refuse an output folder we must not write into, before any heavy work."""
        out, flag = self.out, self.flag
        if out.is_symlink():
            raise LayerIFError(f"{flag} {out} is a symbolic link; give the real folder")
        if out.exists() and not out.is_dir():
            raise LayerIFError(f"{flag} {out} exists and is not a folder")
        ancestor = out.absolute().parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise LayerIFError(f"cannot create {flag} {out}: {ancestor} is not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise LayerIFError(f"cannot write {flag} {out}: {ancestor} is not writable")
        if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
            raise LayerIFError(f"cannot write into {flag} {out}: the folder is not writable")
        resolved = out.resolve()
        for model in self.inputs if not self.shared else ():  # adding files beside others cannot hurt a model
            inside = model.is_dir() and model in resolved.parents  # a model file's own folder may hold outputs
            if resolved == model or inside or resolved in model.parents:
                raise LayerIFError(f"{flag} {out} is, is inside, or contains the input model {model}; "
                                   "choose a separate folder")
        if out.is_dir():
            self._check_contents()

    def _check_contents(self) -> None:
        out, flag = self.out, self.flag
        owned = read_manifest(out)
        entries = {entry.name: entry for entry in out.iterdir()}
        if self.uses_checkpoint and CHECKPOINT in entries and not checkpoint_is_ours(entries[CHECKPOINT]):
            raise LayerIFError(f"{out / CHECKPOINT} was not written by layerif (no checkpoint manifest of ours, or "
                               "a link); move it away, it is never deleted")
        foreign = sorted(name for name, entry in entries.items()
                         if name != MANIFEST and (name not in owned or entry.is_symlink())
                         and not (name == CHECKPOINT and checkpoint_is_ours(entry)))
        clashes = sorted(name for name in self.names if name in foreign)
        if clashes:
            raise LayerIFError(f"{flag} {out} holds {clashes[0]}, which layerif did not write; it would be replaced, "
                               "so move it away or choose another folder")
        if foreign and not self.overwrite and not self.shared:
            raise LayerIFError(f"{flag} {out} already holds other files (e.g. {foreign[0]}); pass --overwrite to "
                               "write beside them (they are kept) or choose another folder")
        earlier = sorted(name for name, command in owned.items()
                         if name in entries and (command == self.command or name in self.names))
        if earlier and not self.overwrite and not self.shared:  # adding beside: our own earlier output is replaced
            what = "another run" if "run.json" in earlier else f"{earlier[0]} from an earlier run"
            raise LayerIFError(f"{flag} {out} already holds {what}; pass --overwrite or choose another directory")

    # ---- running ----
    def __enter__(self) -> OutputFolder:
        self.check()
        parent = self.out.absolute().parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LayerIFError(f"cannot create {parent}: {exc.strerror}") from exc
        self._created = missing  # deepest first
        self._lock()
        try:
            self.check()  # again, now that no other command can change the folder
            self._checkpoint_existed = self.checkpoint_dir.exists()
            self._out_existed = self.out.exists()
            self._remove_stale_staging()
            self.staging = _staging_path(self.out)
            self.staging.mkdir()
            _write_manifest(self.staging, {})  # marks the staging folder as ours while it is being filled
        except BaseException:
            self._release(None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release(exc_type)

    def _lock(self) -> None:
        path = _lock_path(self.out)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise LayerIFError(f"cannot create the lock file {path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LayerIFError(f"{self.flag} {self.out} is in use by another layerif command (pid {holder}); "
                                   "wait for it to finish or choose another folder") from None
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file that the previous holder unlinked while we waited
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _remove_stale_staging(self) -> None:
        for stale in self.out.parent.glob(f".{self.out.name}.staging-*"):
            if not _real_dir(stale):
                continue
            # a killed command's staging folder: marked by our manifest, or killed before that was in place
            unmarked = all(entry.name.startswith(f".{MANIFEST}.") and entry.name.endswith(".tmp")
                           for entry in stale.iterdir())
            if _real_file(stale / MANIFEST) or unmarked:
                shutil.rmtree(stale, ignore_errors=True)

    def _release(self, exc_type) -> None:
        if self.staging is not None and _real_dir(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)
        if exc_type is not None and not self.published:
            self._after_failure(exc_type)
        if self._lock_fd is not None:
            try:
                _lock_path(self.out).unlink(missing_ok=True)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None
        for created in self._created:
            try:
                created.rmdir()
            except OSError:
                break

    def _after_failure(self, exc_type) -> None:
        checkpoint = self.checkpoint_dir
        has_units = False
        if self.uses_checkpoint and checkpoint_is_ours(checkpoint):
            has_units = checkpoint_has_units(checkpoint)
        if issubclass(exc_type, KeyboardInterrupt) and has_units:  # Ctrl-C / SIGTERM: keep what resumes
            last_interrupted.update(kept=str(checkpoint))
            return
        if self.uses_checkpoint and not self._checkpoint_existed and checkpoint_is_ours(checkpoint):
            discard_checkpoint(checkpoint)
        if not self._out_existed and _real_dir(self.out) and not any(self.out.iterdir()):
            self.out.rmdir()

    # ---- publishing ----
    def publish(self) -> Path:
        """Switch the staged outputs into --out: all at once where the folder holds only our files of this command."""
        staging, out = self.staging, self.out
        assert staging is not None, "publish() is called inside `with folder:`"
        staged = sorted(entry.name for entry in staging.iterdir() if entry.name != MANIFEST)
        if not out.exists():
            _write_manifest(staging, dict.fromkeys(staged, self.command))
            rename(staging, out)
            self.staging, self.published = None, True
            return out
        owned = read_manifest(out)
        entries = {entry.name: entry for entry in out.iterdir()}
        foreign = [name for name, entry in entries.items()
                   if name != MANIFEST and (name not in owned or entry.is_symlink())
                   and not (name == CHECKPOINT and checkpoint_is_ours(entry))]
        clashes = sorted(set(staged) & set(foreign))
        if clashes:
            raise LayerIFError(f"{self.flag} {out} holds {clashes[0]}, which layerif did not write; nothing was "
                               "replaced: move it away and run again")
        replaced = {name for name, command in owned.items()
                    if name in entries and (command == self.command or name in staged) and not self.shared}
        replaced |= set(staged) & set(owned)
        kept = {name: command for name, command in owned.items() if name in entries and name not in replaced}
        files = {**kept, **dict.fromkeys(staged, self.command)}
        only_ours = not foreign and not kept
        if only_ours:
            _write_manifest(staging, files)
            if exchange(staging, out):
                old = staging  # the previous run now sits at the staging path
            else:
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                rename(out, old)
                rename(staging, out)
            self.staging, self.published = None, True
            _remove_ours(old, [*owned, CHECKPOINT, MANIFEST])
            try:
                old.rmdir()
            except OSError:
                pass  # someone put a file there meanwhile: it stays
            return out
        # The folder also holds the user's (or another command's) files: switch ours in one by one, the manifest last.
        for name in staged:  # every target is absent or a plain file of ours (checked above)
            rename(staging / name, out / name)
        _remove_ours(out, sorted(replaced - set(staged)))
        _write_manifest(out, files)
        if self.uses_checkpoint:
            discard_checkpoint(self.checkpoint_dir)
        self.published = True
        return out
