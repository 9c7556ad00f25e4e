"""Calibration and evaluation data: find the text, tokenize it, draw windows, cache the result.

No pruning logic lives here. The draw of calibration windows reproduces the SparseGPT / Wanda /
D²Prune C4 loader bit for bit (same random sequence, same acceptance rule), so that a seed means the
same windows as in the reference code when the documents and the tokenizer are the same.

Sources are given by name (``c4``, ``wikitext2``, ``ptb``: see ``KNOWN_SOURCES``) or by path (json
lines, parquet, a ``datasets.save_to_disk`` folder, a folder of such files, or any plain-text file).
A name whose local file is missing falls back to the Hugging Face Hub.

Modules: :mod:`~d2prune.data.sources` (where a source lives), :mod:`~d2prune.data.readers` (its
texts), :mod:`~d2prune.data.cache` (fingerprints and the token cache), :mod:`~d2prune.data.tokens`
(windows, evaluation tokens, training blocks), :mod:`~d2prune.data.bos` (``--window-bos``). The public
names are re-exported here.
"""

from d2prune.data.bos import WINDOW_BOS_CHOICES, WindowBos, resolve_window_bos
from d2prune.data.cache import CACHE_FORMAT_VERSION, default_cache_dir, sha256_path, source_info, tokenizer_identity
from d2prune.data.readers import C4_EVAL_DOCS, parse_json_lines, wikitext_rows_from_raw
from d2prune.data.sources import (
    KNOWN_SOURCES,
    HubSpec,
    Layout,
    Purpose,
    ResolvedSource,
    default_data_dir,
    resolve_source,
)
from d2prune.data.tokens import get_calibration, get_eval_tokens, get_heldout, get_train_blocks

__all__ = [
    "C4_EVAL_DOCS",
    "CACHE_FORMAT_VERSION",
    "KNOWN_SOURCES",
    "WINDOW_BOS_CHOICES",
    "HubSpec",
    "Layout",
    "Purpose",
    "ResolvedSource",
    "WindowBos",
    "default_cache_dir",
    "default_data_dir",
    "get_calibration",
    "get_eval_tokens",
    "get_heldout",
    "get_train_blocks",
    "parse_json_lines",
    "resolve_source",
    "resolve_window_bos",
    "sha256_path",
    "source_info",
    "tokenizer_identity",
    "wikitext_rows_from_raw",
]
