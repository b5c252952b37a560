"""`layerif report`: one self-contained HTML page (inline SVG, no scripts, no links out) for one or more runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np

from layerif.errors import LayerIFError
from layerif.io import atomic_write_text
from layerif.report import figures
from layerif.report.compare import (
    AllocationTable,
    ModelInputs,
    TaskComparison,
    compare_tasks,
    expert_allocations,
    sparsity_allocations,
)
from layerif.report.load import RunView, load_run, unique_names
from layerif.report.reading import describe_run, describe_tasks
from layerif.scores import AGGREGATIONS

GENERATOR = "layerif report"
EXPERTS_PER_LAYER = 5  # default budget: 5 experts per layer on average (the paper's 160 for 32 layers)

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:1.5em auto;
max-width:1200px;padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin:1.4em 0 .4em}.muted{color:#666;font-size:.9em}
section.reading{background:#f5f7fa;border-left:4px solid #4a78b5;padding:.4em 1em;margin:.8em 0}
table{border-collapse:collapse;font-size:.8em;margin:.4em 0}td,th{border:1px solid #ddd;padding:2px 6px;
text-align:right;white-space:nowrap}th{background:#f0f0f0}td.key,th.key{text-align:left}
.scroll{overflow-x:auto}details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
svg{max-width:100%;height:auto}nav a{margin-right:1em}ul.skipped{font-size:.85em;color:#666}
"""


@dataclass
class ReportOptions:
    """The settings a report's allocations are computed at."""

    budget: int | None = None  # total experts per run; None = EXPERTS_PER_LAYER x its number of layers
    beta: float = 2.5
    sparsity: float = 0.5
    epsilon: float = 0.3
    score: str = "S_pos"
    smooth: bool = True

    def validate(self) -> None:
        """Raise LayerIFError for settings no allocation can use."""
        from layerif.allocate.sparsity import check_epsilon, check_sparsity

        if self.score not in AGGREGATIONS:
            raise LayerIFError(f"unknown score {self.score!r}; choose from {', '.join(AGGREGATIONS)}")
        if not np.isfinite(self.beta) or self.beta <= 0:
            raise LayerIFError(f"--beta must be > 0, got {self.beta}")
        if self.budget is not None and self.budget < 1:
            raise LayerIFError(f"--budget must be a positive number of experts, got {self.budget}")
        check_sparsity(self.sparsity)
        check_epsilon(self.epsilon)


def model_inputs(model: str | None, calib: str | None = None, calib_sequences: int = 128,
                 calib_length: int | None = None, quiet: bool = True) -> ModelInputs:
    """Load `model` once and compute its PL_Alpha_Hill (and OWL outlier ratios when calibration text is given)."""
    if model is None:
        if calib is not None:
            raise LayerIFError("--calib needs --model (OWL measures the model's activations)")
        return ModelInputs()
    from layerif.allocate.experts import model_alphas
    from layerif.models import load_model

    loaded = load_model(model, quiet=quiet)
    outlier = None
    if calib is not None:
        from layerif.allocate.metrics import owl_outlier_ratios
        from layerif.calibration import calibration_ids, default_length

        ids = calibration_ids(calib, loaded.tokenizer, calib_sequences, calib_length or default_length(loaded.model))
        outlier = owl_outlier_ratios(loaded.model, ids, quiet=quiet)
    return ModelInputs(loaded.model, model_alphas(loaded.model), outlier)


def check_output(out: str | Path) -> Path:
    """Refuse an output path that is a folder or a file this command did not write."""
    out = Path(out)
    if out.is_dir():
        raise LayerIFError(f"--out {out} is a directory; give a file name such as report.html")
    if out.exists():
        try:
            head = out.read_text(encoding="utf-8", errors="replace")[:2048]
        except OSError as exc:
            raise LayerIFError(f"--out {out}: cannot read the existing file ({exc})") from exc
        if f'<meta name="generator" content="{GENERATOR}">' not in head:
            raise LayerIFError(f"--out {out} exists and is not a layerif report; choose another file name")
    return out


def build_report(runs: list[str | Path], out: str | Path, options: ReportOptions | None = None,
                 inputs: ModelInputs | None = None) -> Path:
    """Read the run folders, render the page and write it atomically to `out`."""
    options = options or ReportOptions()
    options.validate()
    if not runs:
        raise LayerIFError("give at least one run folder")
    out = check_output(out)
    from layerif.compare.results import load_compare

    # a folder written by `layerif compare` renders as a comparison section; the others are scoring runs
    compares = [(name, load_compare(path)) for path, name in zip(runs, unique_names(runs))
                if (Path(path) / "compare.json").is_file()]
    score_runs = [(path, name) for path, name in zip(runs, unique_names(runs)) if not (Path(path) / "compare.json").is_file()]
    views = [load_run(path, name) for path, name in score_runs]
    for view in views:
        if options.budget is not None and options.budget < view.n_layers:
            raise LayerIFError(f"--budget {options.budget} is below the {view.n_layers} blocks of {view.name} "
                               f"(every block needs at least one expert)")
    return atomic_write_text(out, render_report(views, options, inputs or ModelInputs(), compares))


def render_report(views: list[RunView], options: ReportOptions, inputs: ModelInputs,
                  compares: list[tuple[str, dict]] = ()) -> str:
    """The whole HTML page as a string."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("layerif")
    except PackageNotFoundError:
        package = "unknown"
    comparison = compare_tasks(views, options.score) if len(views) > 1 else None
    body = [f"<h1>LayerIF report</h1><p class='muted'>{len(views)} run(s); allocations from {escape(options.score)};"
            f" written {escape(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))} by layerif "
            f"{escape(package)}. Higher score = more sensitive to the data = less well trained.</p>"]
    links = [f"<a href='#run{index}'>{escape(view.name)}</a>" for index, view in enumerate(views)]
    links += [f"<a href='#compare{index}'>{escape(name)}</a>" for index, (name, _) in enumerate(compares)]
    if comparison is not None:
        links.append("<a href='#tasks'>across runs</a>")
    body.append(f"<nav>{''.join(links)}</nav>")
    if comparison is not None:
        body.append(_tasks_section(comparison, options))
    for index, view in enumerate(views):
        body.append(_run_section(index, view, options, inputs))
    for index, (name, data) in enumerate(compares):
        body.append(_compare_section(index, name, data))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f'<meta name="generator" content="{GENERATOR}">'
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>LayerIF report: {escape(', '.join(view.name for view in views))}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _compare_section(index: int, name: str, data: dict) -> str:
    """A `layerif compare` folder: the per-allocation table, every verdict, the ε sweeps."""
    import pandas as pd

    from layerif.compare.results import accuracy_text

    setting = data["setting"]
    first = data["allocations"][0]["allocation"] if data["allocations"] else ""
    rows = []
    for arm in data["allocations"]:
        ppl = [run["test_ppl"] for run in data["runs"] if run["allocation"] == arm["allocation"]]
        verdict = next((v for v in data["verdicts"] if v["allocation"] == first and v["baseline"] == arm["allocation"]),
                       {})
        rows.append({"allocation": arm["allocation"], "ε": "—" if arm["epsilon"] is None else f"{arm['epsilon']:g}",
                     "runs": len(ppl), "test ppl (mean)": float(np.mean(ppl)) if ppl else float("nan"),
                     "min": min(ppl, default=float("nan")), "max": max(ppl, default=float("nan")),
                     f"{first} / row": verdict.get("ratio", float("nan")), "lo": verdict.get("lo", float("nan")),
                     "hi": verdict.get("hi", float("nan")), "p": verdict.get("p", float("nan")),
                     "reading": verdict.get("reading", "—"),
                     "one-level lo": verdict.get("one_level", {}).get("lo", float("nan")),
                     "one-level hi": verdict.get("one_level", {}).get("hi", float("nan"))})
    sentences = [f"{v['allocation']} vs {v['baseline']}: {v['reading']} (ratio {v['ratio']:.3f}, 95 % "
                 f"[{v['lo']:.3f}, {v['hi']:.3f}], p = {v['p']:.3g}; {v['runs'][0]} vs {v['runs'][1]} runs)"
                 for v in data["verdicts"]] or ["no comparison has finished yet"]
    summary = (f"{setting['method']} at {setting['sparsity']:g} on {setting['model']}; {setting['calib_seeds']} "
               f"calibration seed(s), ε from {setting['epsilon_grid']} on {setting['valid_windows']} validation "
               f"windows, {setting['test_windows']} test windows of {setting['window_length']} tokens; intervals: "
               f"two-level bootstrap (seeds, then blocks of {setting['block_windows']} windows)"
               + ("" if data.get("complete") else "; PARTIAL: not every run has finished"))
    sweeps = pd.DataFrame([{"allocation": arm["allocation"], **{f"ε {k}": v for k, v in arm["sweep"].items()}}
                           for arm in data["allocations"] if arm["sweep"] and arm["epsilon_from"] == arm["allocation"]])
    zeroshot = data.get("zeroshot") or {}
    accuracy = pd.DataFrame([{"allocation": row["allocation"], **{task: row["tasks"][task]["acc"]
                                                                  for task in zeroshot["tasks"]},
                              "mean acc": row["mean_acc"], "stderr": row["mean_acc_stderr"]}
                             for row in zeroshot.get("rows", [])])
    sentences += [f"zero-shot, {v['allocation']} vs {v['baseline']}: {v['reading']} ({accuracy_text(v)}; "
                  "calibration seed 0)" for v in zeroshot.get("verdicts", [])]
    return (f"<h2 id='compare{index}'>{escape(name)}: comparison</h2><p class='muted'>{escape(summary)}</p>"
            f"{_frame_table(pd.DataFrame(rows))}{_reading(sentences, f'compare{index}-reading')}"
            + ("" if sweeps.empty else f"<h3>ε sweep (validation perplexity)</h3>{_frame_table(sweeps)}")
            + ("" if accuracy.empty else "<h3>Zero-shot accuracy (first run of each allocation)</h3>"
               f"{_frame_table(accuracy)}"))


def _reading(sentences: list[str], section_id: str) -> str:
    items = "".join(f"<li>{escape(sentence)}</li>" for sentence in sentences)
    return f"<section class='reading' id='{section_id}'><h3>Reading</h3><ul>{items}</ul></section>"


def _cell(value, text: str | None = None) -> str:
    """A numeric table cell carrying the exact value in data-value."""
    if isinstance(value, (int, np.integer)):
        return f"<td data-value='{int(value)}'>{text or int(value)}</td>"
    value = float(value)
    shown = text if text is not None else (f"{value:.6g}" if np.isfinite(value) else "n/a")
    return f"<td data-value='{escape(repr(value))}'>{escape(shown)}</td>"


def _frame_table(frame) -> str:
    head = "".join(f"<th>{escape(str(column))}</th>" for column in frame.columns)
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for value in record:
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                cells.append(_cell(value))
            else:
                cells.append(f"<td class='key'>{escape(str(value))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<div class='scroll'><table class='csv'><tr>{head}</tr>{''.join(rows)}</table></div>"


def _allocation_table(table: AllocationTable) -> str:
    if not table.values:
        return "<p>No allocation could be computed.</p>"
    n_layers = len(next(iter(table.values.values())))
    head = "<th class='key'>method</th>" + "".join(f"<th>{layer}</th>" for layer in range(n_layers))
    head += "<th>total</th>" if table.kind == "experts" else "<th>min–max</th>"
    rows = []
    for method, values in table.values.items():
        if table.kind == "experts":
            cells = "".join(_cell(int(v)) for v in values) + _cell(int(values.sum()))
        else:
            cells = "".join(_cell(float(v), f"{100 * v:.1f}") for v in values)
            cells += f"<td>{100 * values.min():.1f}–{100 * values.max():.1f}</td>"
        rows.append(f"<tr data-method='{escape(method)}'><td class='key'>{escape(method)}</td>{cells}</tr>")
    skipped = "".join(f"<li>{escape(method)}: not computed ({escape(reason)})</li>"
                      for method, reason in table.skipped.items())
    return (f"<div class='scroll'><table class='allocation' data-kind='{table.kind}'><tr>{head}</tr>"
            f"{''.join(rows)}</table></div>" + (f"<ul class='skipped'>{skipped}</ul>" if skipped else ""))


def _agreement_table(agreement: dict | None) -> str:
    """The run's estimator agreement (run.json `agreement`) as a table; '' when the run has one estimator."""
    pairs = (agreement or {}).get("pairs") or []
    if not pairs:
        return ""
    head = "<th class='key'>estimators</th>" + "".join(f"<th>{how}</th>" for how in AGGREGATIONS)
    rows = []
    for pair in pairs:
        cells = "".join(_cell(float(pair[how]), f"{pair[how]:.2f}") if pair.get(how) is not None else "<td>n/a</td>"
                        for how in AGGREGATIONS)
        label = f"{pair['a']} – {pair['b']}"
        rows.append(f"<tr data-pair='{escape(pair['a'])},{escape(pair['b'])}'><td class='key'>{escape(label)}</td>"
                    f"{cells}</tr>")
    return f"<div class='scroll'><table class='agreement'><tr>{head}</tr>{''.join(rows)}</table></div>"


def _flatten(data, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(data, dict) and data:
        rows = []
        for key, value in data.items():
            rows.extend(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    text = data if isinstance(data, str) else json.dumps(data, default=str)
    return [(prefix, text)]


def _details(view: RunView, section_id: str) -> str:
    groups = [(key, view.record.get(key)) for key in ("config", "model", "data", "plan", "timings_s")]
    groups += [(key, value) for key, value in view.record.items() if key not in dict(groups) and key != "format"]
    parts = []
    for title, value in groups:
        if value is None:
            continue
        rows = "".join(f"<tr><td class='key'>{escape(key)}</td><td class='key'>{escape(text)}</td></tr>"
                       for key, text in _flatten(value, title))
        parts.append(f"<table class='record' data-group='{escape(title)}'>{rows}</table>")
    return (f"<details id='{section_id}'><summary>Run record (run.json): config, model, data hashes, plan, "
            f"timings</summary>{''.join(parts)}</details>")


def _run_section(index: int, view: RunView, options: ReportOptions, inputs: ModelInputs) -> str:
    prefix = f"run{index}"
    budget = options.budget or EXPERTS_PER_LAYER * view.n_layers
    experts = expert_allocations(view, budget, options.beta, options.score, inputs)
    sparsity = sparsity_allocations(view, options.sparsity, options.epsilon, options.score, options.smooth, inputs)
    data = view.record.get("data") or {}
    summary = (f"model {view.model}; training data {view.task}; n_train {data.get('n_train', '?')}, n_val "
               f"{data.get('n_val', '?')}; estimator {(view.record.get('config') or {}).get('estimator', '?')}; "
               f"{view.n_layers} blocks; folder {view.path}")
    parts = [f"<h2 id='{prefix}'>{escape(view.name)}</h2><p class='muted'>{escape(summary)}</p>",
             _reading(describe_run(view, options.score, experts, sparsity), f"{prefix}-reading")]
    bands = [how for how in AGGREGATIONS if view.has_interval(how)]
    band_note = (f" Shaded: 95 % bootstrap interval ({', '.join(bands)})." if bands
                 else " No bootstrap intervals in this run.")
    parts.append(f"<section id='{prefix}-profile'><h3>Layer profile</h3><p class='muted'>Each aggregation on its "
                 f"own scale.{escape(band_note)}</p>{figures.profile_svg(view, f'{prefix}-profile')}</section>")
    agreement = _agreement_table(view.record.get("agreement"))
    if agreement:
        parts.append(f"<section id='{prefix}-agreement'><h3>Estimator agreement</h3><p class='muted'>Spearman ρ of "
                     "the layer profiles of each pair of estimators, scored from one gradient capture (layer_scores."
                     f"&lt;estimator&gt;.csv); the rest of this section shows the first estimator.</p>{agreement}"
                     "</section>")
    share = figures.module_share_svg(view, f"{prefix}-modules")
    parts.append(f"<section id='{prefix}-modules'><h3>Per-module share</h3>" + (
        "<p class='muted'>Each matrix's share of the summed per-module S_pos of its block (columns S_pos[…] of "
        f"layer_scores.csv).</p>{share}" if share else "<p>This run has no per-module columns.</p>") + "</section>")
    parts.append(f"<section id='{prefix}-npos'><h3>Beneficial samples per block (n_pos)</h3>"
                 f"{figures.n_pos_svg(view, f'{prefix}-npos')}</section>")
    parts.append(f"<section id='{prefix}-experts'><h3>Expert counts at a budget of {budget} (β {options.beta:g})"
                 f"</h3>{figures.allocation_svg(experts, f'{prefix}-experts') or ''}{_allocation_table(experts)}"
                 "</section>")
    parts.append(f"<section id='{prefix}-sparsity'><h3>Pruning ratios (%) at a mean sparsity of "
                 f"{options.sparsity:.0%} (ε {options.epsilon:g})</h3>"
                 f"{figures.allocation_svg(sparsity, f'{prefix}-sparsity') or ''}{_allocation_table(sparsity)}"
                 "</section>")
    parts.append(f"<details id='{prefix}-table'><summary>layer_scores.csv</summary>{_frame_table(view.frame)}"
                 "</details>")
    parts.append(_details(view, f"{prefix}-details"))
    return f"<article data-run='{escape(view.name)}'>{''.join(parts)}</article>"


def _tasks_section(comparison: TaskComparison, options: ReportOptions) -> str:
    names = [comparison.names[i] for i in comparison.order]
    matrix = comparison.similarity[np.ix_(comparison.order, comparison.order)]
    head = "<th class='key'></th>" + "".join(f"<th>{escape(name)}</th>" for name in names)
    rows = "".join(f"<tr><td class='key'>{escape(name)}</td>{''.join(_cell(v, f'{v:.2f}') for v in row)}</tr>"
                   for name, row in zip(names, matrix))
    return (f"<h2 id='tasks'>Across runs</h2>{_reading(describe_tasks(comparison), 'tasks-reading')}"
            f"<section id='tasks-profiles'><h3>Run × block ({escape(options.score)}, min-max per run)</h3>"
            f"{figures.task_profile_svg(comparison, options.score, 'tasks-profiles')}</section>"
            "<section id='tasks-similarity'><h3>Similarity of profiles (Spearman ρ, clustered order)</h3>"
            f"{figures.similarity_svg(comparison, 'tasks-similarity')}"
            f"<div class='scroll'><table class='similarity'><tr>{head}</tr>{rows}</table></div></section>")
