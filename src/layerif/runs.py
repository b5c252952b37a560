"""A scoring run end to end: load model and data, score, write the run directory atomically."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from layerif.api import ScoreConfig, peak_rss_bytes, restart_peak_rss, score_layers
from layerif.errors import LayerIFError
from layerif.influence.lissa import convergence_warning
from layerif.io import atomic_write_json
from layerif.outdir import CHECKPOINT, OutputFolder
from layerif.scores import LayerScores

OUTPUT_FILES = ("layer_scores.csv", "influence.safetensors", "layer_scores.png", "run.json")


def output_files(config: ScoreConfig) -> list[str]:
    """The files a run writes: OUTPUT_FILES, plus each estimator's scores and influence when several are given."""
    names = config.estimators
    extra = [] if len(names) == 1 else [f"{stem}.{name}.{ending}" for name in names
                                        for stem, ending in (("layer_scores", "csv"), ("influence", "safetensors"))]
    return [*OUTPUT_FILES[:2], *extra, *OUTPUT_FILES[2:]]
CHECKPOINT_DIR = CHECKPOINT  # inside --out while a run is unfinished; removed once its outputs are in place


@dataclass
class ScoreRun:
    """Where the model, data and outputs of a `layerif score` run are."""

    model: str
    train: str | None
    val: str | None
    out: str
    gguf_file: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    dtype: str | None = None
    device: str | None = None
    device_map: str | None = None
    overwrite: bool = False
    demo_task: str | None = None
    spill_dir: str | None = None  # default: inside the run's checkpoint directory, on --out's disk
    trust_remote_code: bool = False  # run code shipped in a model folder (--trust-remote-code)
    config: ScoreConfig = field(default_factory=ScoreConfig)


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("layerif", "torch", "transformers", "peft", "numpy", "safetensors", "datasets"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


def check_output_dir(out: Path, overwrite: bool, command: str = "stability") -> None:
    """The output-folder policy's checks, for a command that does not publish through it yet."""
    OutputFolder(out, command, overwrite=overwrite).check()


def output_folder(run: ScoreRun) -> OutputFolder:
    """The --out folder of a scoring run under the output-folder policy."""
    return OutputFolder(run.out, "score", overwrite=run.overwrite, inputs=[run.model], names=output_files(run.config),
                        checkpoint=True)


def validate(run: ScoreRun) -> OutputFolder:
    """Check every argument that can be checked before loading data or the model; the checked --out folder."""
    from layerif.models.load import check_device, check_model_source, resolve_dtype
    from layerif.sizes import parse_bytes

    run.config.validate()
    config = run.config
    if config.sample_seed is not None and config.sample_seed < 0:
        raise LayerIFError(f"--sample-seed must be >= 0, got {config.sample_seed}")
    if config.lora_rank < 1:
        raise LayerIFError(f"--lora-rank must be >= 1, got {config.lora_rank}")
    if not config.finetune_epochs >= 0 or config.finetune_epochs == float("inf"):
        raise LayerIFError(f"--finetune-epochs must be a finite number >= 0, got {config.finetune_epochs}")
    budget = parse_bytes(config.max_memory)
    if budget is not None and budget < 1 << 20:
        print(f"warning: --max-memory {config.max_memory} is below 1 MiB: every layer gets passes of its own "
              "(slow; fine for testing)", file=sys.stderr)
    if run.spill_dir is not None:
        spill = Path(run.spill_dir)
        if spill.is_symlink() and not spill.exists():
            raise LayerIFError(f"--spill-dir {run.spill_dir} is a dangling link")
        if spill.exists() and not spill.is_dir():
            raise LayerIFError(f"--spill-dir {run.spill_dir} exists and is not a folder")
    resolve_dtype(run.dtype)
    if run.device_map is None:
        check_device(run.device)
    if run.demo_task is None:
        from layerif.data.loading import check_source

        for source, split in ((run.train, run.train_split), (run.val, run.val_split)):
            if source is None:
                raise LayerIFError("both --train and --val are needed")
            check_source(source, split)
    check_model_source(run.model, run.gguf_file, run.trust_remote_code)
    folder = output_folder(run)
    folder.check()
    return folder


def _data_info(source: str | None, split: str | None) -> dict:
    from layerif.data.loading import file_sha256

    if source is None:
        return {"source": "built-in"}
    info: dict = {"source": str(source), "split": split}
    if Path(source).is_file():
        info["sha256"] = file_sha256(source)
    return info


def _load_rows(run: ScoreRun):
    from layerif.data import demo_rows, load_rows

    if run.demo_task is not None:
        config = run.config
        n_train = config.n_train or 300
        n_val = config.n_val or 50
        rows = demo_rows(run.demo_task, n_train + n_val, seed=0)
        return rows[:n_train], rows[n_train:]
    if run.train is None or run.val is None:
        raise LayerIFError("both --train and --val are needed")
    quiet = run.config.quiet
    return load_rows(run.train, run.train_split, quiet), load_rows(run.val, run.val_split, quiet)


def run_score(run: ScoreRun) -> tuple[LayerScores, Path]:
    """Score layers and write layer_scores.csv, influence.safetensors, layer_scores.png and run.json.

    With several estimators each one's scores also go to layer_scores.<estimator>.csv and
    influence.<estimator>.safetensors (the first estimator's are the plain files and the returned LayerScores),
    and run.json gets the agreement of their profiles.
    """

    folder = validate(run)
    from layerif import distributed

    dist = distributed.current()
    if not dist.is_main:  # data-parallel: rank 0 owns (locks, publishes) the output folder
        return _score(run, folder, None)
    with folder:
        return _score(run, folder, folder.staging)


def _score(run: ScoreRun, folder: OutputFolder, staging: Path | None) -> tuple[LayerScores, Path]:
    from layerif import distributed
    from layerif.models import load_model
    from layerif.report.plots import plot_layer_scores

    out = folder.out
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    train_rows, val_rows = _load_rows(run)
    timings["load_data_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    dist = distributed.current()
    device = run.device or (f"cuda:{dist.local_rank}" if _cuda_available() else "cpu")
    loaded = load_model(run.model, run.gguf_file, run.dtype, None if run.device_map else device,
                        device_map=run.device_map, quiet=run.config.quiet, trust_remote_code=run.trust_remote_code)
    timings["load_model_s"] = time.perf_counter() - clock
    peak_is_scoring = restart_peak_rss()  # so the model's loading peak does not hide the scoring peak
    result = score_layers(loaded.model, loaded.tokenizer, train_rows, val_rows, run.config,
                          checkpoint_dir=str(folder.checkpoint_dir), restart=run.overwrite,
                          spill_dir=run.spill_dir or str(folder.checkpoint_dir))
    by_estimator = result if isinstance(result, dict) else {run.config.estimator: result}
    scores = next(iter(by_estimator.values()))
    scoring_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if peak_is_scoring else None
    timings.update(scores.metadata.pop("timings", {}))
    if staging is None:
        return scores, out

    clock = time.perf_counter()
    from layerif.models import find_blocks

    scores.metadata["model"] = {"source": loaded.source, "gguf_file": loaded.gguf_file,
                                "revision": loaded.revision, "class": type(loaded.model).__name__,
                                "blocks_path": find_blocks(loaded.model)[0]}
    for other in by_estimator.values():
        other.metadata["model"] = scores.metadata["model"]
    scores.save(staging)
    if len(by_estimator) > 1:
        for name, each in by_estimator.items():
            each.save(staging, name)
    plot_layer_scores(scores, staging / "layer_scores.png", title=f"LayerIF scores — {loaded.source}")
    timings["write_s"] = time.perf_counter() - clock
    record = {
        "format": "layerif.run/1",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(run.config),
        "model": {**scores.metadata["model"], "argument": run.model, "dtype": str(next(loaded.model.parameters()).dtype),
                  "device": device, "n_layers": scores.n_layers},
        "data": {"train": _data_info(run.train, run.train_split) if run.demo_task is None else
                 {"source": f"built-in demo task {run.demo_task!r}"},
                 "val": _data_info(run.val, run.val_split) if run.demo_task is None else
                 {"source": f"built-in demo task {run.demo_task!r}"},
                 "n_train": scores.n_train, "n_val": scores.n_val,
                 "train_tokens": scores.metadata.get("train_tokens"), "val_tokens": scores.metadata.get("val_tokens")},
        "plan": scores.metadata.get("plan"),
        "passes": scores.metadata.get("train_passes"),
        "resumed": scores.metadata.get("resumed"),
        "world_size": scores.metadata.get("world_size"),
        "left_out": scores.metadata.get("left_out"),
        **_estimator_record(by_estimator),
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_scoring_bytes": scoring_peak,
        "peak_gpu_bytes": scores.metadata.get("peak_gpu_bytes"),
        "versions": package_versions(),
        "outputs": output_files(run.config),
    }
    atomic_write_json(staging / "run.json", record)
    folder.publish()
    for name, each in by_estimator.items():
        line = convergence_warning(each.metadata.get("convergence"), name)
        if line:
            print(line, file=sys.stderr)
    return scores, out


def _estimator_record(by_estimator: dict[str, LayerScores]) -> dict:
    """run.json's estimator part: solver info, LiSSA's convergence and, for several estimators, their agreement."""
    if len(by_estimator) == 1:
        scores = next(iter(by_estimator.values()))
        return {"estimator_info": scores.metadata.get("estimator_info") or None,
                "convergence": scores.metadata.get("convergence")}
    from layerif.scores import estimator_agreement

    return {"estimators": list(by_estimator),
            "estimator_info": {name: each.metadata.get("estimator_info") or None for name, each in by_estimator.items()},
            "convergence": {name: each.metadata["convergence"] for name, each in by_estimator.items()
                            if each.metadata.get("convergence")} or None,
            "estimator_s": {name: round(each.metadata.get("estimator_s", 0.0), 3) for name, each in by_estimator.items()},
            "agreement": {"method": "Spearman correlation of the layer profiles", "pairs": estimator_agreement(by_estimator)}}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def describe(path: Path) -> str:
    """One line naming the files of a run directory."""
    record = json.loads((path / "run.json").read_text())
    return f"wrote {', '.join(record['outputs'])} to {path} ({record['passes']} pass(es), {record['plan']['mode']})"
