"""The CLI's options come from the job dataclasses: defaults match the jobs, shared flags read the same."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest
import typer

from layerif import cli
from layerif.options import OPTIONS, Option, job_options

JOB_COMMANDS = {  # command path -> (job class, fields whose CLI default differs from the job's on purpose)
    ("allocate", "sparsity"): (cli.SparsityJob, {}),
    ("allocate", "experts"): (cli.ExpertsJob, {}),
    ("prune",): (cli.PruneJob, {"allocation": "uniform"}),
    ("compare", "prune"): (cli.ComparePruneJob, {"sparsity": None, "scores": [], "dense": False,
                                                  "epsilon_grid": cli.ComparePruneJob.epsilon_grid}),
    ("compare", "moe"): (cli.CompareMoEJob, {"base": False}),
    ("evaluate",): (cli.EvalJob, {}),
    ("moe", "train"): (cli.MoETrainJob, {}),
    ("moe", "evaluate"): (cli.MoEEvalJob, {"methods": "loglik,generate"}),
    ("export", "peft"): (cli.PeftExportJob, {}),
    ("export", "sparsity"): (cli.SparsityExportJob, {}),
    ("report",): (cli.ReportJob, {"out": None, "runs": None}),
}
NEGATED = {"smooth": False}  # --no-smooth: the CLI holds the negation


def _command(path: tuple[str, ...]):
    group = typer.main.get_command(cli.app)
    for name in path:
        group = group.commands[name]
    return group


@pytest.mark.parametrize("path", sorted(JOB_COMMANDS))
def test_cli_defaults_are_the_jobs_defaults(path):
    job, differs = JOB_COMMANDS[path]
    params = {param.name: param for param in _command(path).params}
    for spec in dataclasses.fields(job):
        if spec.name not in params:
            continue
        param = params[spec.name]
        if spec.name in differs:
            expected = differs[spec.name]
        elif spec.name in NEGATED:
            expected = NEGATED[spec.name]
        elif spec.default is not dataclasses.MISSING:
            expected = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            expected = spec.default_factory()
        else:
            expected = None
            assert param.required, (path, spec.name)
        if spec.name == "tasks" or spec.name == "labels":
            expected = None  # comma lists: None on both sides
        assert param.default == expected or (param.required and expected is None), (path, spec.name, param.default)


def test_a_shared_option_reads_the_same_wherever_it_is_not_overridden():
    seen: dict[str, set[str]] = {}
    for path in JOB_COMMANDS:
        for param in _command(path).params:
            if param.name in OPTIONS and param.help == OPTIONS[param.name].help:
                seen.setdefault(param.name, set()).add(param.opts[0])
    assert {"model", "dtype", "device", "overwrite", "quiet", "sparsity", "method"} <= set(seen)
    assert all(len(flags) == 1 for flags in seen.values()), seen


def test_command_bodies_only_run_the_job_and_print():
    tree = ast.parse(inspect.getsource(cli))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.decorator_list:
            body = node.body[1:] if isinstance(node.body[0].value if isinstance(node.body[0], ast.Expr) else None,
                                               ast.Constant) else node.body
            assert len(body) <= 14, f"{node.name} has {len(body)} statements; move the work into its job"
            assert any("job" in ast.unparse(statement) for statement in body), node.name


def test_a_job_field_without_help_is_refused_at_import():
    @dataclasses.dataclass
    class Unhelped:
        model: str
        frobnicate: int = 3

    with pytest.raises(ValueError, match="frobnicate"):
        job_options(Unhelped)


@dataclasses.dataclass
class Job:
    model: str
    smooth: bool = True
    names: list[str] | None = None
    hidden: int = 0


def test_converters_and_fixed_fields_reach_the_job():
    from typer.testing import CliRunner

    app = typer.Typer()
    seen = []

    @app.command()
    @job_options(Job, own={"names": cli.comma_list("Names.")}, fixed={"hidden": 7})
    def run(job: Job) -> None:
        seen.append(job)

    result = CliRunner().invoke(app, ["--model", "m", "--no-smooth", "--names", "a, b"])
    assert result.exit_code == 0, result.output
    assert seen == [Job(model="m", smooth=False, names=["a", "b"], hidden=7)]
    assert isinstance(OPTIONS["smooth"], Option)
