"""Ground truth for per-layer influence: layer-restricted leave-group-out retraining on a tiny Llama.

A tiny Llama built in code is trained until it fits a synthetic mapping task (input symbols a_1..a_k, then
f(a_1)..f(a_k) for a fixed permutation f). The scored training set mixes clean rows with rows whose outputs
follow another permutation (corrupted labels); validation rows are clean. For every block l and each of
`groups` random groups of training rows, block l alone (every other weight frozen) is fine-tuned from the
same start for a fixed number of full-batch Adam steps on the training set with and without the group; the
change of the validation loss (without minus with) is the ground truth. All groups of a block train at
once (torch.func.vmap over stacked copies of the block's weights).

Each estimator predicts that change as sum_{i in group} q_i^(l) (q = -I: positive q means the row helps).
Reported per estimator: Spearman per block between predicted and actual change of the summed validation
loss, and the linear datamodeling score (LDS): the same Spearman per validation row (from the pairwise
q), averaged over rows and blocks.

    python bench/ground_truth.py                 # writes bench/results/ground_truth.md (a few minutes, 2 cores)
    python bench/ground_truth.py --groups 20 --out /tmp/gt.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from layerif.api import ScoreConfig, score_layers
from layerif.data.tokens import per_sample_loss as row_losses  # per-row mean next-token cross-entropy
from layerif.io import atomic_write_text

ESTIMATORS = ("datainf", "exact", "identity", "lissa", "ekfac")
BOS, SEP = 2, 3
FIRST_SYMBOL = 4


@dataclass
class GroundTruthConfig:
    """Sizes of one ground-truth run."""

    layers: int = 4
    hidden: int = 32
    vocab: int = 24
    pairs: int = 4  # symbols per row: a row is BOS a_1..a_k SEP f(a_1)..f(a_k)
    n_train: int = 64
    n_val: int = 16
    corrupted: float = 0.25  # share of training rows whose outputs follow another permutation
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    groups: int = 50
    group_fraction: float = 0.2  # rows removed per group
    converge_steps: int = 150  # Adam steps fitting block l to the whole training set first (0: start pretrained)
    converge_lr: float = 1e-2
    steps: int = 20  # full-batch fine-tuning steps of one block, with and without each group
    optimiser: str = "sgd"  # sgd (plain gradient descent) or adam
    lr: float = 0.02
    seed: int = 0
    estimators: tuple[str, ...] = field(default_factory=lambda: ESTIMATORS)


def tiny_llama(config: GroundTruthConfig):
    """A random Llama from a config (eager attention, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    llama = LlamaConfig(vocab_size=config.vocab, hidden_size=config.hidden, intermediate_size=2 * config.hidden,
                        num_hidden_layers=config.layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=BOS, eos_token_id=1)
    model = LlamaForCausalLM(llama)
    model.config._attn_implementation = "eager"
    return model


def mapping_rows(n: int, permutation: torch.Tensor, pairs: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2 + 2 * pairs) token ids: BOS, consecutive symbols from a random start, SEP, their images."""
    symbols = len(permutation)
    start = torch.randint(0, symbols, (n, 1), generator=generator)
    inputs = (start + torch.arange(pairs)) % symbols
    outputs = permutation[inputs]
    column = torch.full((n, 1), 0, dtype=torch.long)
    return torch.cat([column + BOS, inputs + FIRST_SYMBOL, column + SEP, outputs + FIRST_SYMBOL], dim=1)


def make_data(config: GroundTruthConfig):
    """(pretraining sampler, train ids, corrupted mask, val ids) of the synthetic task."""
    generator = torch.Generator().manual_seed(config.seed)
    symbols = config.vocab - FIRST_SYMBOL
    clean = torch.randperm(symbols, generator=generator)
    other = torch.randperm(symbols, generator=generator)
    train = mapping_rows(config.n_train, clean, config.pairs, generator)
    corrupted = torch.rand(config.n_train, generator=generator) < config.corrupted
    bad = mapping_rows(config.n_train, other, config.pairs, generator)
    train[corrupted] = torch.cat([train[corrupted, : config.pairs + 2], bad[corrupted, config.pairs + 2:]], 1)
    val = mapping_rows(config.n_val, clean, config.pairs, generator)

    def sample(n: int) -> torch.Tensor:
        return mapping_rows(n, clean, config.pairs, generator)

    return sample, train, corrupted, val


def pretrain(model, sample, config: GroundTruthConfig) -> float:
    """Adam on fresh clean rows until the task is fit; returns the final loss on the output tokens."""
    optimiser = torch.optim.Adam(model.parameters(), lr=config.pretrain_lr)
    model.train()
    for _ in range(config.pretrain_steps):
        ids = sample(64)
        loss = row_losses(model(input_ids=ids, use_cache=False).logits, ids).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    ids = sample(256)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    targets = ids[:, config.pairs + 3:]  # the output symbols, predicted from SEP onwards
    predicted = logits[:, config.pairs + 2: -1].argmax(-1)
    return float((predicted == targets).float().mean())


def converge_block(model, layer: int, train: torch.Tensor, config: GroundTruthConfig) -> float:
    """Fit block `layer` alone to the whole training set (full-batch Adam); returns the final training loss."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(f"model.layers.{layer}."))
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.converge_lr)
    for _ in range(config.converge_steps):
        loss = row_losses(model(input_ids=train, use_cache=False).logits, train).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for p, flag in flags:
        p.requires_grad_(flag)
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def retrain_block(model, layer: int, train: torch.Tensor, val: torch.Tensor, weights: torch.Tensor,
                  config: GroundTruthConfig) -> torch.Tensor:
    """(groups, n_val) validation losses after fine-tuning block `layer` with per-group row weights (groups, n)."""
    from torch.func import functional_call, grad, vmap

    prefix = f"model.layers.{layer}."
    block = {name: p.detach() for name, p in model.named_parameters() if name.startswith(prefix)}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not name.startswith(prefix)}
    groups = weights.shape[0]
    params = {name: p.unsqueeze(0).repeat(groups, *[1] * p.dim()).clone() for name, p in block.items()}

    def losses(block_params, ids):
        logits = functional_call(model, {**frozen, **block_params}, (ids,), {"use_cache": False}).logits
        return row_losses(logits, ids)

    def train_loss(block_params, row_weights):
        return (losses(block_params, train) * row_weights).sum() / row_weights.sum()

    gradient = vmap(grad(train_loss))
    first, second = ({name: torch.zeros_like(p) for name, p in params.items()} for _ in range(2))
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, config.steps + 1):  # written out so that it runs on the stacked copies
        grads = gradient(params, weights)
        if config.optimiser == "sgd":
            params = {name: params[name] - config.lr * grads[name] for name in params}
            continue
        for name in params:
            first[name].mul_(beta1).add_(grads[name], alpha=1 - beta1)
            second[name].mul_(beta2).addcmul_(grads[name], grads[name], value=1 - beta2)
            update = (first[name] / (1 - beta1**step)) / ((second[name] / (1 - beta2**step)).sqrt() + eps)
            params[name] = params[name] - config.lr * update
    with torch.no_grad():
        return vmap(losses, in_dims=(0, None))(params, val)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two vectors (average ranks for ties)."""
    from scipy.stats import spearmanr

    value = spearmanr(a.double().numpy(), b.double().numpy()).statistic
    return float(value) if value == value else 0.0


def run(config: GroundTruthConfig, quiet: bool = True) -> dict:
    """Train, score with every estimator, retrain every block per group; correlations and timings."""
    started = time.perf_counter()
    model = tiny_llama(config)
    sample, train, corrupted, val = make_data(config)
    accuracy = pretrain(model, sample, config)
    timings = {"pretrain_s": time.perf_counter() - started}

    generator = torch.Generator().manual_seed(config.seed + 1)
    removed = max(1, round(config.group_fraction * config.n_train))
    keys = torch.rand(config.groups, config.n_train, generator=generator).argsort(1)[:, :removed]
    in_group = torch.zeros(config.groups, config.n_train).scatter_(1, keys, 1.0)
    weights = torch.cat([torch.ones(1, config.n_train), 1.0 - in_group])  # row 0: nothing removed

    per_block, profiles = [], {estimator: [] for estimator in config.estimators}
    timings.update({f"score_{estimator}_s": 0.0 for estimator in config.estimators}, retrain_s=0.0)
    for layer in range(config.layers):
        start_model = model
        if config.converge_steps:
            # the influence function describes leaving rows out at an optimum of the training objective:
            # start both runs from block l fitted to the whole training set
            start_model = copy.deepcopy(model)
            converge_block(start_model, layer, train, config)
        scores = {}
        for estimator in config.estimators:
            began = time.perf_counter()
            result = score_layers(start_model, None, list(train), list(val),
                                  ScoreConfig(estimator=estimator, pairwise=True, batch_size=config.n_train,
                                              compute_dtype="float64", quiet=quiet))
            scores[estimator] = (result.q[layer].double(), result.q_pairwise[layer].double())
            profiles[estimator].append(float(result.q[layer].clamp(min=0).sum()))
            timings[f"score_{estimator}_s"] += time.perf_counter() - began
        began = time.perf_counter()
        losses = retrain_block(start_model, layer, train, val, weights, config)
        timings["retrain_s"] += time.perf_counter() - began
        actual_each = (losses[1:] - losses[0]).double()  # (groups, n_val): without minus with
        actual = actual_each.sum(1)
        entry = {"layer": layer, "actual_mean": float(actual.mean()), "actual_std": float(actual.std()),
                 "corrupted_removed_vs_actual": spearman(in_group[:, corrupted].sum(1), actual)}
        for estimator, (q, q_pair) in scores.items():
            predicted = in_group.double() @ q
            predicted_each = in_group.double() @ q_pair  # (groups, n_val)
            entry[estimator] = spearman(predicted, actual)
            entry[f"{estimator}_lds"] = sum(spearman(predicted_each[:, j], actual_each[:, j])
                                            for j in range(config.n_val)) / config.n_val
        per_block.append(entry)
    timings["total_s"] = time.perf_counter() - started
    summary = {estimator: {"mean_spearman": sum(b[estimator] for b in per_block) / len(per_block),
                           "lds": sum(b[f"{estimator}_lds"] for b in per_block) / len(per_block)}
               for estimator in config.estimators}
    actual_profile = [b["actual_std"] for b in per_block]
    return {"config": asdict(config), "accuracy_after_pretraining": accuracy, "per_block": per_block,
            "summary": summary, "s_pos": profiles, "actual_std_per_block": actual_profile,
            "profile_spearman_vs_actual_std": {e: spearman(torch.tensor(p), torch.tensor(actual_profile))
                                               for e, p in profiles.items()},
            "timings": timings}


def to_markdown(result: dict, command: str) -> str:
    """The committed report."""
    config = result["config"]
    estimators = list(result["summary"])
    lines = [
        "# Ground truth: layer-restricted leave-group-out retraining\n",
        f"Command: `{command}`\n",
        f"Tiny Llama ({config['layers']} blocks, hidden {config['hidden']}, vocab {config['vocab']}) pretrained "
        f"{config['pretrain_steps']} Adam steps on clean mapping rows (output-token accuracy after pretraining "
        f"{result['accuracy_after_pretraining']:.3f}). Scored: {config['n_train']} training rows "
        f"({config['corrupted']:.0%} with corrupted outputs) x {config['n_val']} clean validation rows. "
        f"Per block: block l alone first fitted to the whole training set ({config['converge_steps']} full-batch Adam "
        f"steps, lr {config['converge_lr']}; every estimator scores that model), then {config['groups']} random groups "
        f"of {config['group_fraction']:.0%} of the rows; from there block l alone fine-tuned "
        f"{config['steps']} full-batch {config['optimiser']} steps (lr {config['lr']}) with and without each group.\n",
        "Predicted change of the validation loss on removing a group = sum of the group's q (q = -I).\n",
        "## Spearman(predicted, actual) per block, summed validation loss\n",
        "| block | " + " | ".join(estimators) + " | #corrupted removed | actual std |",
        "|---|" + "---|" * (len(estimators) + 2),
    ]
    for entry in result["per_block"]:
        lines.append(f"| {entry['layer']} | " + " | ".join(f"{entry[e]:.3f}" for e in estimators)
                     + f" | {entry['corrupted_removed_vs_actual']:.3f} | {entry['actual_std']:.2e} |")
    lines += ["", "## Per estimator (mean over blocks)", "",
              "| estimator | mean Spearman | LDS (per validation row, mean) | S_pos profile vs actual spread (Spearman) | scoring time (s) |",
              "|---|---|---|---|---|"]
    for estimator in estimators:
        summary = result["summary"][estimator]
        lines.append(f"| {estimator} | {summary['mean_spearman']:.3f} | {summary['lds']:.3f} | "
                     f"{result['profile_spearman_vs_actual_std'][estimator]:.3f} | "
                     f"{result['timings'][f'score_{estimator}_s']:.1f} |")
    lines += ["", f"Timings: pretraining {result['timings']['pretrain_s']:.0f} s, retraining "
              f"{result['timings']['retrain_s']:.0f} s, total {result['timings']['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sizes = ("groups", "steps", "n_train", "n_val", "layers", "converge_steps", "lr", "seed")
    for name in sizes:
        default = getattr(GroundTruthConfig, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--optimiser", choices=("sgd", "adam"), default=GroundTruthConfig.optimiser)
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ground_truth.md"))
    args = parser.parse_args(argv)
    config = GroundTruthConfig(**{name: getattr(args, name) for name in sizes}, optimiser=args.optimiser,
                               estimators=tuple(args.estimators.split(",")))
    result = run(config)
    command = "python bench/ground_truth.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = to_markdown(result, command.strip())
    atomic_write_text(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
