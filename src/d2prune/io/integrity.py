"""Damaged inputs caught early: model-folder files that do not parse, safetensors shards that are
truncated or corrupt (NaN/inf values are :mod:`d2prune.engine.finite`'s).

transformers and safetensors report such files with whatever their parser hits first
(``OverflowError: cannot fit 'int' into an index-sized integer``, ``struct.error``, a JSON error
deep in a config loader). These checks read only file headers and name the file, so every command
that loads a model stops with one line that says which file is damaged.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from d2prune.errors import UserError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"

# Bytes per element of the safetensors dtypes (the header's names).
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "U64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
# The safetensors dtypes with a torch dtype of the same name (the ones checkpoints hold).
_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
# safetensors refuses headers above 100 MB; a larger size field is a damaged file, not a big one.
_MAX_HEADER = 100_000_000


def read_json_file(path: Path, what: str) -> Any:
    """The JSON in ``path``; a missing, unreadable or unparsable file is a UserError naming it."""
    if path.is_dir():
        raise UserError(f"{path} is a folder, but the {what} must be a file")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the {what} {path}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a valid safetensors file ({why}): it is truncated or damaged; copy it again")


def safetensors_torch_dtype(name: str):
    """The torch dtype of a safetensors header's dtype name, or None for one torch has no match for here."""
    import torch

    return getattr(torch, _TORCH_NAMES[name]) if name in _TORCH_NAMES else None


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The tensor entries of a safetensors file's header (``__metadata__`` dropped), after checking
    that the header parses and that every tensor's bytes lie within the file, as ``safe_open`` would
    (reads only the header)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, but a safetensors weight file was expected")
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(0)
            if size < 8:
                raise _damaged(path, f"only {size} bytes")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(_MAX_HEADER, size - 8):
                raise _damaged(path, f"its header claims {n} bytes, the file has {size}")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {_reason(exc)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"its header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    data = size - 8 - n
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
            itemsize = _ITEMSIZE.get(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"the header entry of {name!r} is malformed") from None
        if not 0 <= begin <= stop or (itemsize is not None and stop - begin != numel * itemsize):
            raise _damaged(path, f"the header entry of {name!r} is inconsistent")
        end = max(end, stop)
    if end > data:
        raise _damaged(path, f"its tensors need {end} data bytes, the file holds {data}")
    return header


def check_model_folder(folder: str | Path) -> None:
    """Check the files of a local HF model folder that loading reads first: ``config.json`` parses
    to an object, the safetensors index (if any) parses and names shards that exist, and every
    safetensors shard's header is sound. A damaged one is a UserError naming it."""
    folder = Path(folder)
    config = read_json_file(folder / CONFIG_FILE, "model config")
    if not isinstance(config, dict):
        raise UserError(f"the model config {folder / CONFIG_FILE} is not a JSON object")
    index = folder / INDEX_FILE
    if index.exists():
        data = read_json_file(index, "safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"the safetensors index {index} has no valid weight_map (tensor name -> file name)")
        headers = {}
        for file in sorted(set(weight_map.values())):
            if not (folder / file).exists():
                raise UserError(f"the safetensors index {index} names {file}, which is not in {folder}")
            headers[file] = safetensors_header(folder / file)
        missing = [name for name, file in weight_map.items() if name not in headers[file]]
        if missing:
            raise UserError(
                f"the safetensors index {index} places {missing[0]} in {weight_map[missing[0]]}, which does not "
                f"hold it ({len(missing)} such tensors): the index does not belong to these shards"
            )
        return
    for file in sorted(folder.glob("*.safetensors")):
        safetensors_header(file)
