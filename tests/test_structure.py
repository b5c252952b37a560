"""Code-shape rules of the engine: small signatures in gradients/ and influence/, a short score_layers."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import layerif
from layerif import api

PACKAGE = Path(layerif.__file__).parent


def test_no_function_takes_more_than_six_parameters_in_the_engine():
    too_long = []
    for folder in ("gradients", "influence"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
                count = len([name for name in names if name not in ("self", "cls")])
                if count > 6:
                    too_long.append(f"{folder}/{path.name}:{node.name} ({count})")
    assert too_long == []


def test_score_layers_stays_short():
    assert len(inspect.getsource(api.score_layers).splitlines()) < 60
