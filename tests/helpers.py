"""Builders for tests: tiny models of several architectures and a real HF tokenizer made in code."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import WORDS


def tiny_gpt2(layers: int = 2, hidden: int = 32, seed: int = 0, vocab: int = 64):
    """A random GPT-2 (Conv1D weights) built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                        bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    model.config._attn_implementation = "eager"
    return model.eval()


def tiny_neox(layers: int = 2, hidden: int = 32, seed: int = 0, vocab: int = 64):
    """A random GPT-NeoX (Pythia layout) built from a config."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=2 * hidden, max_position_embeddings=128, bos_token_id=2,
                           eos_token_id=1, pad_token_id=0)
    model = GPTNeoXForCausalLM(config)
    model.config._attn_implementation = "eager"
    return model.eval()


def hf_tokenizer(directory: Path | None = None):
    """A real `PreTrainedTokenizerFast` (word level) over the test vocabulary; saved to `directory` if given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for extra in ("what", "is", "the", "answer", "of", "plus", "capital", "opposite", "word"):
        vocab.setdefault(extra, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        bos_token="<s>", unk_token="<unk>")
    if directory is not None:
        tokenizer.save_pretrained(directory)
    return tokenizer


def save_tiny_model(directory: Path, layers: int = 3, seed: int = 0) -> Path:
    """A tiny Llama + tokenizer saved as a local Hugging Face model directory."""
    from tests.conftest import tiny_llama

    model = tiny_llama(layers=layers, seed=seed)
    model.save_pretrained(directory)
    hf_tokenizer(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in the instruction / input / output / answer format."""
    from tests.conftest import tiny_texts

    texts = tiny_texts(n, seed=seed)
    return [{"instruction": f"what is {text}", "input": "", "output": f"answer {text.split()[0]}",
             "answer": text.split()[0]} for text in texts]


def run_cli(*args: str) -> int:
    """Run the `layerif` command in-process and return its exit code."""
    from layerif.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 32, vocab: int = 64, seed: int = 0) -> Path:
    """A tiny random Llama written as a GGUF file (float32 tensors, a sentencepiece-style vocabulary)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    heads, kv_heads, ff = 4, 2, 2 * hidden
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    # single characters: every lower-case text tokenizes without merges
    pieces = ["\u2581", *"abcdefghijklmnopqrstuvwxyz0123456789.,?'"]
    tokens = ["<unk>", "<s>", "</s>"] + [pieces[i] if i < len(pieces) else f"<extra{i}>" for i in range(vocab - 3)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def random(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    random("token_embd.weight", vocab, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    random("output.weight", vocab, hidden)
    for layer in range(layers):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(hidden, np.float32))
        random(prefix + "attn_q.weight", hidden, hidden)
        random(prefix + "attn_k.weight", kv_heads * head_dim, hidden)
        random(prefix + "attn_v.weight", kv_heads * head_dim, hidden)
        random(prefix + "attn_output.weight", hidden, hidden)
        random(prefix + "ffn_gate.weight", ff, hidden)
        random(prefix + "ffn_up.weight", ff, hidden)
        random(prefix + "ffn_down.weight", hidden, ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (links not followed): file bytes and mode, link targets, folders."""
    import os

    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = ("link", os.readlink(path))
            elif path.is_dir():
                state[key] = ("dir", path.stat().st_mode)
            else:
                state[key] = ("file", path.read_bytes(), path.stat().st_mode)
    return state


def kill_after_units(job_class: str, test_module: str, out: Path, setup: Path, prefix: str, extra: str = "") -> None:
    """Run `job_class(out=..., **sizes(setup))` in a child slowed by its on_unit callback, SIGKILL it once two
    units named `prefix...` are in its checkpoint manifest, and check it was killed before publishing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    # the pause is in the test's callback, not in the product
    script = (f"import sys, time; sys.path.insert(0, {str(repo)!r})\n"
              "from pathlib import Path\n"
              f"from layerif.compare import {job_class}\n"
              f"from {test_module} import sizes\n"
              f"{job_class}(out={str(out)!r}, {extra}on_unit=lambda result: time.sleep(0.5), "
              f"**sizes(Path({str(setup)!r}))).run()\n")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=repo)
    manifest = out / ".checkpoint" / "manifest.json"
    deadline = time.monotonic() + 600  # generous: a loaded machine makes the child slow, never wrong
    units = 0
    while time.monotonic() < deadline and child.poll() is None:
        if manifest.is_file():
            try:
                units = sum(name.startswith(prefix) for name in json.loads(manifest.read_text())["units"])
            except (ValueError, KeyError):
                units = 0
            if units >= 2:
                break
        time.sleep(0.02)
    alive = child.poll() is None
    if alive:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert alive, "the comparison finished before it could be killed"
    assert units >= 2, f"no two {prefix} units were saved in time"
    assert not (out / "compare.json").exists()


BLOCK_MATRICES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj"]


def write_command_inputs(root: Path, layers: int, n_train: int, n_val: int, calib_lines: int) -> Path:
    """A tiny Llama, train/val rows, a calibration text and made-up layer scores: every command's inputs."""
    from layerif.scores import LayerScores
    from tests.conftest import tiny_texts

    save_tiny_model(root / "model", layers=layers)
    write_jsonl(root / "train.jsonl", instruction_rows(n_train, seed=1))
    write_jsonl(root / "val.jsonl", instruction_rows(n_val, seed=2))
    (root / "calib.txt").write_text("\n".join(tiny_texts(calib_lines, seed=4)))
    q = torch.randn(layers, n_train, generator=torch.Generator().manual_seed(0))
    LayerScores(q=q, module_names=BLOCK_MATRICES, q_modules=q.unsqueeze(1).repeat(1, 7, 1) / 7,
                n_params=[15360] * layers, n_val=n_val).save(root / "scores")
    return root
