"""Command-line options generated from the job dataclasses: each option's flag and help are written once.

A command declares its job class; `job_options` gives it one option per field of the job (default from the
field, flag and help from `OPTIONS` or the command's own entries), builds the job from the parsed values and
calls the command with it. Options that several commands share (--model, --dtype, --calib, ...) therefore
read the same everywhere, and a job's defaults are the CLI's defaults unless a command says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

_FROM_JOB = object()  # sentinel: the option's default is the job field's default


@dataclass(frozen=True)
class Option:
    """How one job field appears on the command line."""

    help: str
    flags: tuple[str, ...] = ()  # default: --field-name
    to_job: Callable[[Any], Any] | None = None  # CLI value -> job value (e.g. --no-smooth -> smooth)
    cli_type: Any = None  # the CLI's type when it differs from the field's
    default: Any = _FROM_JOB  # the CLI's default when it differs from the field's


def _comma_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _negated(value: bool) -> bool:
    return not value


AGGREGATION = Option("Layer score aggregation: S_pos, S_top25 or S_all (also --score).",
                     ("--aggregation", "--score"))  # --score: the earlier name, kept working
OVERWRITE_HELP = "Replace our earlier outputs in --out (files we did not write are always kept)."
SPARSITY_ALLOCATIONS = ("layerif, reversed, uniform, owl, alphapruning, depth (block index as the score), random "
                        "(layerif permuted across blocks by --seed), or a JSON file with one ratio per block")
EXPERT_ALLOCATIONS = ("layerif, reversed, uniform, mola-2468, mola-8642, mola-5555, alphalora, depth (layer index "
                      "as the score), random (layerif counts permuted by --seed), or a comma list of counts per layer")

# Options shared by several commands, by job field name; a command's own entries take precedence.
OPTIONS: dict[str, Option] = {
    "model": Option("Hub id, local model directory, .gguf file, or built-in name (smollm2-135m)."),
    "dtype": Option("Model dtype: float32, bfloat16, float16 (default: the checkpoint's)."),
    "device": Option("cpu, cuda, cuda:1 ... (default: where the model loads)."),
    "overwrite": Option(OVERWRITE_HELP),
    "quiet": Option("No progress bars or table."),
    "scores": Option("Run folder of `layerif score` (for layerif/reversed)."),
    "score": AGGREGATION,
    "score_name": AGGREGATION,
    "smooth": Option("Skip the Savitzky-Golay (7, 3) smoothing.", ("--no-smooth",), _negated, bool, False),
    "sparsity": Option("Target parameter-weighted mean sparsity, inside (0, 1)."),
    "method": Option("magnitude, wanda or sparsegpt."),
    "epsilon": Option("Spread ε of the linear map: ratios span (1 ± ε) before rescaling."),
    "calib": Option("Calibration text (.txt, or JSONL/JSON/CSV rows)."),
    "calib_sequences": Option("Calibration sequences."),
    "calib_length": Option("Tokens per calibration sequence (default min(2048, context))."),
    "budget": Option("Total experts T over all layers (>= number of layers)."),
    "beta": Option("Exponent beta > 0 applied to the scores (or PL_Alpha_Hill)."),
    "top_k": Option("Experts per token: min(k, n_l) per layer (default k = 2)."),
    "split": Option("Split of a datasets dataset."),
    "trust_remote_code": Option("Run Python code shipped in the model folder (auto_map); off unless you trust it."),
    "gguf_file": Option("GGUF file name inside --model's directory."),
    "train_split": Option("Split of a datasets dataset for --train."),
    "val_split": Option("Split of a datasets dataset for --val."),
    "train": Option("Training data: JSONL/JSON/CSV file, or dataset name with --train-split."),
    "val": Option("Validation data: JSONL/JSON/CSV file, or dataset name with --val-split."),
}


def _comma_tuple(text: str | None) -> tuple[str, ...]:
    return tuple(_comma_list(text) or ())


def comma_list(help_text: str, default: str | None = None, flags: tuple[str, ...] = (),
               as_tuple: bool = False) -> Option:
    """An option given as a comma list on the command line and as a list (or tuple) to the job."""
    return Option(help_text, flags, _comma_tuple if as_tuple else _comma_list,
                  str | None if default is None else str, default)


def flag_of(name: str, option: Option) -> tuple[str, ...]:
    """The option's flags (default --field-name)."""
    return option.flags or ("--" + name.replace("_", "-"),)


def job_options(job: type, *, own: dict[str, Option] | None = None, exclude: Iterable[str] = (),
                defaults: dict[str, Any] | None = None,
                fixed: dict[str, Any] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a typer command: one option per field of the dataclass `job`; the command gets `job=`.

    `own` gives this command's flags and help (taking precedence over OPTIONS); `exclude` leaves fields out
    (they keep the job's default, unless another decorator passes them, as `config_options` passes `config`);
    `fixed` sets fields to a value of the command's choosing; `defaults` replaces a field's CLI default. The
    command's own parameters that are not job fields are passed to it as they are.
    """
    own, defaults, fixed = own or {}, defaults or {}, fixed or {}
    excluded = set(exclude) | set(fixed)
    hints = typing.get_type_hints(job)
    specs = [spec for spec in dataclasses.fields(job) if spec.name not in excluded and spec.init]
    missing_help = [spec.name for spec in specs if spec.name not in own and spec.name not in OPTIONS]
    if missing_help:
        raise ValueError(f"{job.__name__} fields without an option: {missing_help}")

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        import typer

        command_hints = typing.get_type_hints(command)
        passthrough = [parameter.replace(annotation=command_hints.get(name, parameter.annotation),
                                         kind=inspect.Parameter.KEYWORD_ONLY)
                       for name, parameter in inspect.signature(command).parameters.items() if name != "job"]
        generated, converters = [], {}
        for spec in specs:
            option = own.get(spec.name) or OPTIONS[spec.name]
            default = defaults.get(spec.name, option.default)
            if default is _FROM_JOB:
                if spec.default is not dataclasses.MISSING:
                    default = spec.default
                elif spec.default_factory is not dataclasses.MISSING:
                    default = spec.default_factory()
                else:
                    default = ...
            annotation = option.cli_type if option.cli_type is not None else hints[spec.name]
            if option.to_job is not None:
                converters[spec.name] = option.to_job
            generated.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                               default=typer.Option(default, *flag_of(spec.name, option),
                                                                    help=option.help)))
        field_names = {spec.name for spec in dataclasses.fields(job)}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: converters[name](value) if name in converters else value
                      for name, value in kwargs.items() if name in field_names}
            rest = {name: value for name, value in kwargs.items() if name not in field_names}
            return command(job=job(**values, **fixed), **rest)

        parameters = passthrough + generated
        wrapper.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        del wrapper.__wrapped__  # typer must read the generated signature, not the command's
        return wrapper

    return decorate
