"""Load task rows (files, hub datasets, built-in demo), turn them into text, tokenise and batch them."""

from layerif.data.demo import DEMO_TASKS, demo_rows
from layerif.data.loading import file_sha256, load_rows, row_text, select_rows
from layerif.data.tokens import Batch, EncodedSet, encode_texts, make_batches

__all__ = [
    "DEMO_TASKS",
    "Batch",
    "EncodedSet",
    "demo_rows",
    "encode_texts",
    "file_sha256",
    "load_rows",
    "make_batches",
    "row_text",
    "select_rows",
]
