"""kronfluence as a peer estimator: its identity and EK-FAC scores of every block's matrices, beside layerif's.

Same rows, tokens and loss as layerif: the train loss and the measurement are layerif's per-sample loss
(`--loss tokens`, the default: the mean next-token cross-entropy over every real token of a row; `answer`: the
same mean over the answer tokens only) summed over the batch, so kronfluence's per-sample gradients are those
of the losses layerif differentiates. Tracked modules: the matrices layerif scores (`select_matrices`); block
Linears with a bias (Qwen2's q/k/v) would add its gradient to kronfluence's scores, SmolLM2 has none.
Per-module pairwise scores (n_val x n_train) are summed per block, and over the validation rows for q [L, n_train].

Sign: kronfluence's score is g_val . P g_train (P = 1 or the EK-FAC inverse), positive when a step on the
training row lowers the validation loss: layerif's q = -I with no sign flip (tests/bench/test_agreement_peer.py
finds identity q equal to float32 rounding on a tiny Llama).

EK-FAC as layerif's `ekfac`: empirical Fisher (the rows' own labels), damping None (0.1 x the mean corrected
eigenvalue = layerif's 0.1 x mean ||g_i||^2 / d_W), and each row's last real token masked out of the activation
covariance like padding (it carries no gradient; layerif's A leaves it out). Left different: layerif's A of a
query matrix also drops the first token wherever its gradient is exactly zero (a softmax over one key), and
kronfluence's keeps it: q_proj's EK-FAC basis differs, every other matrix agrees to float rounding.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

import torch

STRATEGIES = ("identity", "ekfac")


def kronfluence_missing() -> str | None:
    """Why kronfluence cannot be imported here (the ImportError as text), or None when it can."""
    try:
        import kronfluence  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _collate(sets: dict, pad_id: int):
    """A collate function: (set name, sample number) items -> a right-padded batch as a dict (layerif's padding)."""
    from layerif.data.tokens import EncodedSet, make_batches

    def collate(items: list[tuple[str, int]]) -> dict:
        encoded = sets[items[0][0]]
        indices = [index for _, index in items]
        starts = None if encoded.answer_starts is None else [encoded.answer_starts[i] for i in indices]
        batch = make_batches(EncodedSet([encoded.input_ids[i] for i in indices], starts), len(indices), pad_id)[0]
        out = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
        if batch.answer_start is not None:
            out["answer_start"] = batch.answer_start
        return out

    return collate


def _task(loss_fn, tracked: list[str]):
    """A kronfluence Task whose train loss and measurement are layerif's per-sample loss, summed over a batch."""
    from kronfluence.task import Task

    from layerif.data.tokens import Batch

    class LayerifLoss(Task):
        def _losses(self, batch: dict, model) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            rows = Batch(batch["input_ids"], batch["attention_mask"], batch["labels"],
                         torch.arange(len(batch["input_ids"])), batch.get("answer_start"))
            return loss_fn(logits, rows)

        def compute_train_loss(self, batch, model, sample=False):
            del sample  # never True: the factors are fitted with use_empirical_fisher=True
            return self._losses(batch, model).sum()

        def compute_measurement(self, batch, model):
            return self._losses(batch, model).sum()

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            mask = batch["attention_mask"].clone()
            mask.scatter_(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0), 0)
            return mask

    return LayerifLoss()


def kronfluence_scores(model, tokenizer, train: list, val: list, settings: dict, strategies=STRATEGIES,
                       query_batch: int = 10, work: str | Path | None = None) -> dict:
    """Per kronfluence strategy: q [L, n_train], pairwise [L, n_train, n_val] (float64) and wall seconds."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from layerif.api import _prepare
    from layerif.args import ScoreConfig
    from layerif.data.tokens import resolve_loss
    from layerif.models import find_blocks, select_matrices

    config = ScoreConfig(quiet=True, **settings)
    data = _prepare(tokenizer, train, val, config)
    path, _ = find_blocks(model)
    names = [[f"{path}.{layer}.{ref.name}" for ref in refs]
             for layer, refs in enumerate(select_matrices(model, config.modules, "full"))]
    dtype = torch.float64 if config.compute_dtype == "float64" else torch.float32
    task = _task(resolve_loss(config.loss), [name for row in names for name in row])
    started = time.perf_counter()
    # kronfluence swaps the tracked modules for its wrappers in place: the caller's model stays as it is
    wrapped = prepare_model(copy.deepcopy(model), task)
    setup_s = time.perf_counter() - started
    train_set = [("train", i) for i in range(len(data.train_rows))]
    val_set = [("val", i) for i in range(len(data.val_rows))]
    loader = DataLoaderKwargs(collate_fn=_collate({"train": data.train_encoded, "val": data.val_encoded},
                                                  data.pad_id))
    out = {}
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        analyzer = Analyzer("layerif-peer", wrapped, task, cpu=next(model.parameters()).device.type == "cpu",
                            log_level=logging.WARNING, disable_tqdm=config.quiet, output_dir=scratch)
        for strategy in strategies:
            started = time.perf_counter()
            factor_args = FactorArguments(
                strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=dtype,
                gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
            analyzer.fit_all_factors(strategy, train_set, per_device_batch_size=config.batch_size,
                                     dataloader_kwargs=loader, factor_args=factor_args, overwrite_output_dir=True)
            factors_s = time.perf_counter() - started
            score_args = ScoreArguments(damping_factor=None, compute_per_module_scores=True,
                                        per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype)
            analyzer.compute_pairwise_scores(
                strategy, strategy, val_set, train_set, per_device_query_batch_size=query_batch,
                per_device_train_batch_size=config.batch_size, dataloader_kwargs=loader, score_args=score_args,
                overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores(strategy)
            modules = [torch.stack([scores[name].double().sum(0) for name in row]) for row in names]
            blocks = torch.stack([sum(scores[name].double() for name in row).t() for row in names])
            seconds = time.perf_counter() - started
            out[strategy] = {"q": blocks.sum(-1), "pairwise": blocks, "q_modules": modules,
                             "seconds": seconds + setup_s, "factors_s": factors_s, "scores_s": seconds - factors_s}
    return out


def describe(query_batch: int) -> str:
    """The markdown line that says how the kf-* rows were made."""
    from importlib.metadata import version

    return (f"kf-identity / kf-ekfac: kronfluence {version('kronfluence')} on the same rows, loss and matrices "
            "(per-module pairwise scores summed per block and over the validation rows), empirical Fisher, "
            f"damping 0.1 x mean corrected eigenvalue, {query_batch} validation rows per query batch; run time = "
            "its factors and scores, one run per strategy. Its EK-FAC differs from ours only in the query "
            "matrices' activation covariance, which keeps each row's first token (whose query gets no gradient).")


def cached_entries(model, tokenizer, rows: tuple[list, list], settings: dict, query_batch: int, stem: Path) -> dict:
    """kf-identity / kf-ekfac entries for agreement_tables, each strategy saved as soon as it finishes (reruns reuse it)."""
    results = {}
    for strategy in STRATEGIES:
        saved = Path(f"{stem}-kronfluence-{strategy}-q{query_batch}.pt")
        if saved.is_file():
            print(f"  kronfluence {strategy}: reusing {saved}", flush=True)
            results[strategy] = torch.load(saved)
            continue
        print(f"  kronfluence {strategy} ...", flush=True)
        saved.parent.mkdir(parents=True, exist_ok=True)
        entry = kronfluence_scores(model, tokenizer, *rows, settings, strategies=(strategy,), query_batch=query_batch,
                                   work=saved.parent)[strategy]
        torch.save(entry, saved.with_suffix(".tmp"))
        saved.with_suffix(".tmp").replace(saved)
        print(f"    {strategy} {entry['seconds']:.1f} s (factors {entry['factors_s']:.1f} s)", flush=True)
        results[strategy] = entry
    return {f"kf-{name}": {"q": entry["q"], "seconds": entry["seconds"], "influence_s": entry["seconds"],
                           "plan": "kronfluence", "lissa_worst_change": None} for name, entry in results.items()}
