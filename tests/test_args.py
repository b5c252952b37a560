"""Argument groups: flat ScoreConfig, validation from field metadata, and the CLI options generated from them."""

from __future__ import annotations

import dataclasses

import pytest

from layerif.args import (
    GROUPS,
    DataArguments,
    EstimatorArguments,
    ExecutionArguments,
    ScoreConfig,
    SpaceArguments,
    cli_default_of,
    flag_of,
)
from layerif.errors import LayerIFError

# options of `layerif score` that describe where the run reads and writes, not how it scores
RUN_OPTIONS = {"model", "train", "val", "out", "gguf_file", "train_split", "val_split", "spill_dir", "dtype",
               "device", "device_map", "overwrite", "trust_remote_code", "help"}
FLAGS_BEFORE_GROUPS = {  # `layerif score --help` before the argument groups; every one must stay
    "--model", "--train", "--val", "--out", "--gguf-file", "--train-split", "--val-split", "--n-train", "--n-val",
    "--sample-seed", "--max-length", "--params", "--modules", "--estimator", "--batch-size", "--max-memory",
    "--pairwise", "--strategy", "--on-nonfinite", "--spill-dir", "--finetune-epochs", "--lora-rank", "--dtype",
    "--device", "--device-map", "--overwrite", "--quiet"}


def command(name: str):
    import typer

    from layerif.cli import app

    return typer.main.get_command(app).commands[name]


def options(name: str) -> dict:
    return {param.name: param for param in command(name).params}


def test_every_field_has_one_score_option_and_back():
    config_fields = {spec.name: spec for spec in dataclasses.fields(ScoreConfig)}
    generated = {name: param for name, param in options("score").items() if name not in RUN_OPTIONS}
    assert set(generated) == set(config_fields)
    for name, param in generated.items():
        spec = config_fields[name]
        assert param.opts == [flag_of(spec)]
        assert param.default == cli_default_of(spec), name
        assert param.help.startswith(spec.metadata["help"].split("{choices}")[0]) and "{" not in param.help


def test_score_help_keeps_every_flag_and_adds_the_new_ones():
    flags = {opt for param in command("score").params for opt in param.opts}
    assert FLAGS_BEFORE_GROUPS <= flags
    assert {"--loss", "--bootstrap", "--bootstrap-seed", "--lissa-depth", "--lissa-scale"} <= flags


def test_cli_defaults_differ_from_the_api_only_where_declared():
    specs = {spec.name: spec for spec in dataclasses.fields(ScoreConfig)}
    assert ScoreConfig().n_train is None and cli_default_of(specs["n_train"]) == 300
    assert ScoreConfig().n_val is None and cli_default_of(specs["n_val"]) == 50
    differing = {name for name, spec in specs.items() if cli_default_of(spec) != spec.default}
    assert differing == {"n_train", "n_val"}


def test_demo_options_come_from_the_same_fields():
    demo = options("demo")
    specs = {spec.name: spec for spec in dataclasses.fields(ScoreConfig)}
    assert demo["n_train"].default == 120 and demo["n_val"].default == 30
    for name in ("batch_size", "bootstrap", "quiet"):
        assert demo[name].default == specs[name].default and demo[name].help == specs[name].metadata["help"]


def test_groups_partition_the_flat_config():
    names = [spec.name for group in GROUPS for spec in dataclasses.fields(group)]
    assert len(names) == len(set(names))
    assert names == [spec.name for spec in dataclasses.fields(ScoreConfig)]
    assert {"n_train", "n_val", "sample_seed", "max_length", "loss"} == {s.name for s in dataclasses.fields(DataArguments)}
    assert {"lissa_depth", "bootstrap", "bootstrap_seed"} <= {s.name for s in dataclasses.fields(EstimatorArguments)}


def test_flat_construction_access_and_dict():
    config = ScoreConfig(n_train=16, estimator="exact", batch_size=3, lora_rank=4)
    assert config.n_train == 16 and config.estimator == "exact" and config.batch_size == 3
    flat = dataclasses.asdict(config)
    assert flat["n_train"] == 16 and flat["lora_rank"] == 4 and "data" not in flat
    assert set(flat) == {spec.name for spec in dataclasses.fields(ScoreConfig)}
    assert config.group(SpaceArguments) == SpaceArguments(lora_rank=4)
    rebuilt = ScoreConfig.from_groups(config.group(DataArguments), config.group(SpaceArguments),
                                      config.group(EstimatorArguments), config.group(ExecutionArguments))
    assert rebuilt == config
    assert dataclasses.replace(config, n_train=8).n_train == 8
    with pytest.raises(TypeError):
        ScoreConfig(16)  # keyword only: positional order is not part of the contract


@pytest.mark.parametrize("change, message", [
    ({"estimator": "nosuch"}, "unknown estimator 'nosuch'; choose from datainf, exact, identity"),
    ({"params": "half"}, "--params must be full or lora, got 'half'"),
    ({"strategy": "later"}, "--strategy must be auto, store, spill or stream, got 'later'"),
    ({"loss": "words"}, "--loss must be tokens or answer, got 'words'"),
    ({"compute_dtype": "float16"}, "--compute-dtype must be float32 or float64"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"n_train": 0}, "--n-train must be >= 1"),
    ({"max_length": 1}, "--max-length must be >= 2"),
    ({"bootstrap": -1}, "--bootstrap must be >= 0"),
    ({"lissa_scale": 0.0}, "--lissa-scale must be positive"),
    ({"max_memory": "lots"}, "cannot read memory size"),
])
def test_validate_names_the_option(change, message):
    with pytest.raises(LayerIFError, match="^" + message.replace("(", r"\(")):
        ScoreConfig(**change).validate()


def test_estimator_choices_follow_the_registry(monkeypatch):
    from layerif.influence import estimators

    for name in ("lissa", "ekfac"):
        ScoreConfig(estimator=name).validate()
    with pytest.raises(LayerIFError, match="unknown estimator 'tracin'"):
        ScoreConfig(estimator="tracin").validate()
    monkeypatch.setattr(estimators, "ESTIMATORS", (*estimators.ESTIMATORS, "tracin"))
    ScoreConfig(estimator="tracin").validate()


def test_a_callable_loss_passes_validation():
    ScoreConfig(loss=lambda logits, batch: logits.sum(dim=(1, 2))).validate()
    ScoreConfig(loss="answer", max_memory="1GiB", lissa_scale=2.0).validate()


def test_cli_values_reach_the_config(monkeypatch, capsys):
    import layerif.runs
    from tests.helpers import run_cli

    seen = {}

    def capture(run):
        seen["run"] = run
        raise LayerIFError("captured")

    monkeypatch.setattr(layerif.runs, "run_score", capture)
    code = run_cli("score", "--model", "m", "--train", "t", "--val", "v", "--out", "o", "--estimator", "exact",
                   "--bootstrap", "100", "--bootstrap-seed", "3", "--max-memory", "2GiB", "--n-val", "7", "--quiet",
                   "--lissa-scale", "4.5")
    assert code == 2 and "captured" in capsys.readouterr().err
    config = seen["run"].config
    assert isinstance(config, ScoreConfig)
    assert (config.estimator, config.bootstrap, config.bootstrap_seed, config.max_memory) == ("exact", 100, 3, "2GiB")
    assert (config.n_train, config.n_val, config.quiet, config.lissa_scale) == (300, 7, True, 4.5)
    assert seen["run"].model == "m" and seen["run"].out == "o"


def test_stability_shares_the_scoring_options():
    stability = options("stability")
    for spec in dataclasses.fields(ScoreConfig):
        if spec.name in ("n_train", "n_val", "sample_seed"):  # per split there, and the splits have their own seed
            continue
        assert stability[spec.name].opts == [flag_of(spec)] and stability[spec.name].default == cli_default_of(spec)
    assert stability["n_train"].required and stability["n_val"].required and "sample_seed" not in stability


def test_lissa_and_estimator_list_options_reach_the_config(monkeypatch, capsys):
    import layerif.runs
    from tests.helpers import run_cli

    seen = {}

    def capture(run):
        seen["config"] = run.config
        raise LayerIFError("captured")

    monkeypatch.setattr(layerif.runs, "run_score", capture)
    code = run_cli("score", "--model", "m", "--train", "t", "--val", "v", "--out", "o", "--estimator", "lissa,exact",
                   "--lissa-tol", "0.01", "--lissa-batch", "8", "--lissa-repeats", "3", "--lissa-depth", "50")
    assert code == 2 and "captured" in capsys.readouterr().err
    config = seen["config"]
    assert config.estimators == ["lissa", "exact"]
    assert (config.lissa_tol, config.lissa_batch, config.lissa_repeats, config.lissa_depth) == (0.01, 8, 3, 50)
    with pytest.raises(LayerIFError, match="--lissa-tol must be >= 0"):
        ScoreConfig(lissa_tol=-1.0).validate()
