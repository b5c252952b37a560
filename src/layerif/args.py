"""Arguments of a scoring run in four groups (data, parameter space, estimator, execution).

Each field's metadata (help, choices, flag) is the single source of the `layerif score` options: the CLI
generates one option per field (`config_options`), so help text and defaults live here only.

One deliberate difference between the API and the CLI, kept in the field itself: `n_train` / `n_val`
default to None in Python (use every row the caller passes, since the caller chose them) and to the
paper's 300 / 50 on the command line (`cli_default`), where a data file may hold many thousands of rows.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from layerif.errors import LayerIFError

PAPER_N_TRAIN = 300  # training rows scored in the paper (first rows of the split)
PAPER_N_VAL = 50
LOSSES = ("tokens", "answer")
# LiSSA's defaults, repeated from layerif.influence.lissa so that reading the options imports no torch
LISSA_DEPTH, LISSA_KERNEL_DEPTH, LISSA_TOL, LISSA_BATCH, LISSA_REPEATS = 2000, 1_000_000, 1e-3, 64, 1


def _registered_estimators() -> tuple[str, ...]:
    from layerif.influence import estimators

    return tuple(estimators.ESTIMATORS)


def _registered_strategies() -> tuple[str, ...]:
    from layerif.gradients import plan

    return tuple(plan.STRATEGIES)


def _check_memory(value: object) -> None:
    from layerif.sizes import parse_bytes

    parse_bytes(value)


def _positive_or_none(value: float | None) -> None:
    if value is not None and not value > 0:
        raise LayerIFError(f"--lissa-scale must be positive, got {value}")


def argument(default: Any, help: str, *, choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
             minimum: float | None = None, flag: str | None = None, cli_default: Any = MISSING,
             cli_type: type | None = None, check: Callable[[Any], None] | None = None,
             unknown: str | None = None, comma_list: bool = False) -> Any:
    """A dataclass field whose metadata describes its CLI option and its validation.

    choices: allowed values (or a function returning them, for registries filled at runtime); minimum: the
    smallest allowed number (None passes); flag: the option name when not `--field-name`; cli_default: the
    CLI's default when it differs from the API's; cli_type: the option's type when the field's is not a CLI
    type; check: extra validation; unknown: a noun for "unknown <noun> ..." messages instead of "--flag must be";
    comma_list: the value may name several choices, comma-separated, each at most once.
    """
    metadata = {"help": help, "choices": choices, "minimum": minimum, "flag": flag, "cli_default": cli_default,
                "cli_type": cli_type, "check": check, "unknown": unknown, "comma_list": comma_list}
    return field(default=default, metadata=metadata)


def flag_of(spec: dataclasses.Field) -> str:
    """The CLI option of a field, e.g. `--n-train`."""
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def choices_of(spec: dataclasses.Field) -> tuple[str, ...] | None:
    """Allowed values of a field now (registries are read at call time), or None when any value goes."""
    choices = spec.metadata.get("choices")
    return choices() if callable(choices) else choices


def cli_default_of(spec: dataclasses.Field) -> Any:
    """The default of a field's CLI option."""
    value = spec.metadata.get("cli_default", MISSING)
    return spec.default if value is MISSING else value


def _either(names: Iterable[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


class _Arguments:
    """Validation shared by the argument groups: choices, minimums and per-field checks from field metadata."""

    def validate(self) -> None:
        """Raise LayerIFError on a bad value, naming its CLI option."""
        for spec in fields(self):  # type: ignore[arg-type]
            value = getattr(self, spec.name)
            choices = choices_of(spec)
            values = [value]
            if spec.metadata.get("comma_list") and isinstance(value, str):
                values = value.split(",")
                repeated = sorted({item for item in values if values.count(item) > 1})
                if repeated:
                    raise LayerIFError(f"{flag_of(spec)} names {repeated[0]!r} twice in {value!r}")
            for item in values if choices is not None and not callable(value) else ():
                if item in choices:
                    continue
                if spec.metadata.get("unknown"):
                    raise LayerIFError(f"unknown {spec.metadata['unknown']} {item!r}; choose from {', '.join(choices)}")
                raise LayerIFError(f"{flag_of(spec)} must be {_either(choices)}, got {item!r}")
            minimum = spec.metadata.get("minimum")
            if minimum is not None and value is not None and value < minimum:
                raise LayerIFError(f"{flag_of(spec)} must be >= {minimum}, got {value}")
            if spec.metadata.get("check") is not None:
                spec.metadata["check"](value)


@dataclass(kw_only=True)
class DataArguments(_Arguments):
    """Which rows are scored (n_train / n_val None: every row given) and how a sample becomes tokens and a loss."""

    n_train: int | None = argument(None, "Training rows scored: the first n of the data.",
                                   minimum=1, cli_default=PAPER_N_TRAIN)
    n_val: int | None = argument(None, "Validation rows scored: the first n of the data.",
                                 minimum=1, cli_default=PAPER_N_VAL)
    sample_seed: int | None = argument(None, "Pick a random subset with this seed instead of the first rows.")
    max_length: int = argument(128, "Tokens per sample after truncation.", minimum=2)
    loss: str | Callable[..., Any] = argument(
        "tokens", "Per-sample loss: tokens (mean over every real token) or answer (only the tokens of `output`).",
        choices=LOSSES, cli_type=str)


@dataclass(kw_only=True)
class SpaceArguments(_Arguments):
    """The parameter space whose gradients are scored."""

    params: str = argument("full", "Parameter space: full (block weights) or lora (LoRA adapters).",
                           choices=("full", "lora"))
    modules: str = argument("all", "Matrices of each block: attn, mlp or all.", choices=("attn", "mlp", "all"))
    lora_rank: int = argument(8, "LoRA rank for --params lora.", minimum=1)
    lora_alpha: int = argument(16, "LoRA alpha for --params lora.", minimum=1)
    finetune_epochs: float = argument(0.0, "Epochs of LoRA fine-tuning on the train set before scoring (--params lora).",
                                      minimum=0)
    finetune_lr: float = argument(3e-4, "Learning rate of that fine-tuning.", minimum=0)
    seed: int = argument(0, "Seed for LoRA initialisation and fine-tuning.")


@dataclass(kw_only=True)
class EstimatorArguments(_Arguments):
    """How the inverse Hessian is estimated and what is reported about the scores."""

    estimator: str = argument("datainf", "Inverse-Hessian estimator: {choices}; a comma list (e.g. "
                              "datainf,identity,exact) scores each from one gradient capture.",
                              choices=_registered_estimators, unknown="estimator", comma_list=True)
    pairwise: bool = argument(False, "Also keep the n_train x n_val influence matrix per layer.")
    compute_dtype: str = argument("float32", "dtype of the estimator's matmuls: float32 or float64.",
                                  choices=("float32", "float64"))
    lissa_depth: int | None = argument(None, f"Most steps of each LiSSA recursion (--estimator lissa; default "
                                       f"{LISSA_KERNEL_DEPTH:,} in the kernel plan, {LISSA_DEPTH} in the factor plan).",
                                       minimum=1)
    lissa_tol: float = argument(LISSA_TOL, "Stop a matrix's LiSSA recursion once the influence changes by less than "
                                "this (relative) over the last tenth of its steps; 0 runs every step.", minimum=0)
    lissa_scale: float | None = argument(None, "Scale of the LiSSA recursion (--estimator lissa; default: a bound "
                                         "on the largest eigenvalue).", check=_positive_or_none)
    lissa_batch: int | None = argument(None, f"Training samples per LiSSA step (default: all of them in the kernel "
                                       f"plan, {LISSA_BATCH} in the factor plan; all: deterministic).", minimum=1)
    lissa_repeats: int = argument(LISSA_REPEATS, "Independent LiSSA recursions averaged per matrix (mini-batches "
                                  "only).", minimum=1)
    lissa_plan: str = argument("auto", "Where LiSSA's iterates live: kernel (sample coordinates from the n x n "
                               "Gram; cheap steps), factors (weight-shaped; no Gram) or auto (kernel up to 2048 "
                               "training samples). Same iterates either way.", choices=("auto", "kernel", "factors"))
    bootstrap: int = argument(0, "Bootstrap resamples of the training samples for intervals of every score "
                              "(e.g. 1000; 0 = off).", minimum=0)
    bootstrap_seed: int = argument(0, "Seed of the bootstrap resamples.")

    @property
    def estimators(self) -> list[str]:
        """The estimator names of `estimator` (one, or several given as a comma list), in order."""
        return self.estimator.split(",")


@dataclass(kw_only=True)
class ExecutionArguments(_Arguments):
    """How the run executes: batches, memory, strategy, bad samples and progress output."""

    batch_size: int = argument(8, "Samples per forward/backward batch.", minimum=1)
    max_memory: int | str | None = argument(None, "Budget for stored gradients, e.g. 4GiB (default: half the free "
                                            "memory).", cli_type=str, check=_check_memory)
    strategy: str = argument("auto", "auto, store (factors in memory per layer group), spill (factors to disk, "
                             "one pass) or stream (3 passes of sums).", choices=_registered_strategies)
    on_nonfinite: str = argument("error", "A sample with a non-finite loss or gradient: error (stop, naming it) or "
                                 "skip (leave it out, list it in run.json).", choices=("error", "skip"))
    quiet: bool = argument(False, "No progress bars (and no table).")


GROUPS: tuple[type[_Arguments], ...] = (DataArguments, SpaceArguments, EstimatorArguments, ExecutionArguments)


@dataclass(kw_only=True)
class ScoreConfig(ExecutionArguments, EstimatorArguments, SpaceArguments, DataArguments):
    """Arguments of a scoring run: the four groups' fields, flat (`ScoreConfig(n_train=16)`, `config.n_train`).

    `dataclasses.asdict(config)` is the flat dict recorded in run.json; `config.group(DataArguments)` gives one
    group, and `ScoreConfig.from_groups(DataArguments(...), ...)` builds a config from groups.
    """

    def validate(self) -> None:
        """Raise LayerIFError on a bad value or a bad combination of values, naming the options."""
        super().validate()
        if len(self.estimators) > 1 and self.strategy == "stream":
            raise LayerIFError("--strategy stream scores one estimator at a time; use auto, store or spill with "
                               f"--estimator {self.estimator}")

    def group(self, kind: type[_Arguments]) -> _Arguments:
        """A copy of one argument group's fields."""
        return kind(**{spec.name: getattr(self, spec.name) for spec in fields(kind)})

    @classmethod
    def from_groups(cls, *groups: _Arguments) -> ScoreConfig:
        """A config from argument groups (each kind at most once; groups left out keep their defaults)."""
        values: dict[str, Any] = {}
        for given in groups:
            values.update({spec.name: getattr(given, spec.name) for spec in fields(given)})  # type: ignore[arg-type]
        return cls(**values)


# ---- CLI options generated from the fields ----

def config_options(only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                   defaults: dict[str, Any] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a typer command: one option per ScoreConfig field, passed to the command as `config`.

    The command declares its own options plus a `config` parameter; `only` / `exclude` pick fields, and
    `defaults` replaces a field's CLI default for this command (e.g. the demo's smaller n_train).
    """
    defaults = defaults or {}
    hints = typing.get_type_hints(ScoreConfig)
    wanted = [spec for spec in fields(ScoreConfig)
              if (only is None or spec.name in set(only)) and spec.name not in set(exclude)]
    unknown = (set(only or ()) | set(defaults)) - {spec.name for spec in fields(ScoreConfig)}
    if unknown:
        raise ValueError(f"not ScoreConfig fields: {sorted(unknown)}")

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        import typer

        own_hints = typing.get_type_hints(command)
        own = [parameter.replace(annotation=own_hints.get(name, parameter.annotation))
               for name, parameter in inspect.signature(command).parameters.items() if name != "config"]
        generated = []
        for spec in wanted:
            default = defaults.get(spec.name, cli_default_of(spec))
            annotation = spec.metadata.get("cli_type") or hints[spec.name]
            if spec.metadata.get("cli_type") is not None and default is None:
                annotation = annotation | None
            help_text = spec.metadata["help"]
            if "{choices}" in help_text:
                help_text = help_text.replace("{choices}", _either(choices_of(spec) or ()))
            option = typer.Option(default, flag_of(spec), help=help_text)
            generated.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                               annotation=annotation))
        names = {spec.name for spec in wanted}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            config = ScoreConfig(**{name: kwargs.pop(name) for name in list(kwargs) if name in names})
            return command(config=config, **kwargs)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated
        wrapper.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        del wrapper.__wrapped__  # typer must read the generated signature, not the command's
        return wrapper

    return decorate
