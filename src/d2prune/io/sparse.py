"""Sparse model folders: a pruned model's linears stored as kept values plus a mask, loaded back bit for bit.

A sparse folder holds what a dense save holds (config.json, tokenizer, generation config,
sparsity.json) except the weights: ``model.sparse.json`` (the index: format, version, each tensor's
layout and file) and one ``*.sparse.safetensors`` per dense shard (``model.sparse.safetensors``, or
``model-00001-of-00003.sparse.safetensors``...). Tensors the encoding does not shrink (embeddings,
norms, an unpruned lm_head) are stored as they are; the rest as :mod:`d2prune.io.sparse_codec`
describes. There is deliberately no ``model.safetensors``: ``from_pretrained`` on the folder raises
"no file named model.safetensors" instead of random-initializing the pruned linears, and the
folder's README.md says how to load or unpack it.

- ``is_sparse_folder(path)``, ``sparsify_folder(folder, nm)`` (dense weights → sparse, in place)
- ``pack_folder(src, dst)`` / ``unpack_folder(src, dst)`` (atomic)
- ``read_state_dict(folder)``: the decoded tensors (``io.sparse_load`` turns them into a model:
  ``load_sparse``, ``load_pretrained``)

Every shard is converted on its own, so packing or unpacking never holds more than one shard.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from d2prune.errors import UserError
from d2prune.io.atomic import atomic_folder, prepare_folder_target, write_synced

SPARSE_INDEX = "model.sparse.json"
FORMAT = "d2prune-sparse"
VERSION = 1
_DENSE_INDEX = "model.safetensors.index.json"


_SPARSITY_FILE = "sparsity.json"  # io.models.SPARSITY_FILE (models imports this module)
_README = "README.md"
_README_MARK = "<!-- d2prune sparse folder -->"
README_TEXT = f"""{_README_MARK}
# Sparse checkpoint (d2prune)

The pruned linear layers of this model are stored compactly: kept values plus a 1-bit mask (or
N:M in-group indices), in `*.sparse.safetensors` files described by `model.sparse.json`. There is
no `model.safetensors`, so `transformers` alone cannot load this folder (it raises instead of
initialising the pruned weights at random). Load it with d2prune, bit-identical to the dense save:

```python
import d2prune
model = d2prune.load_pretrained("path/to/this/folder")  # a plain transformers model
```

or write a plain dense folder that `AutoModelForCausalLM.from_pretrained` loads:

```
d2prune unpack path/to/this/folder path/to/dense
```

Every d2prune command (`eval`, `finetune`, `prune`) also takes this folder as its model.
"""


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the files directly in ``folder`` (a model folder: dense or sparse)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def is_sparse_folder(path: str | os.PathLike) -> bool:
    """A folder holding a sparse index (``model.sparse.json``)."""
    return (Path(path).expanduser() / SPARSE_INDEX).is_file()


def is_sparse_file(path: Path) -> bool:
    """A file of a sparse folder that a dense copy of it must not carry (index, shards, our README)."""
    if path.name == SPARSE_INDEX or path.name.endswith(".sparse.safetensors"):
        return True
    return path.name == _README and path.read_text(encoding="utf-8", errors="replace").startswith(_README_MARK)


def sparse_name(dense_file: str) -> str:
    """``model-00001-of-00002.safetensors`` → ``model-00001-of-00002.sparse.safetensors``."""
    return dense_file.removesuffix(".safetensors") + ".sparse.safetensors"


def nm_of_record(folder: Path) -> tuple[int, int] | None:
    """``(n, m)`` if the folder's sparsity record names an N:M pattern."""
    from d2prune.patterns import Pattern

    try:
        record = json.loads((folder / _SPARSITY_FILE).read_text(encoding="utf-8"))
        pattern = Pattern.parse(record.get("pattern") or "unstructured")
    except (OSError, ValueError, AttributeError, UserError):
        return None  # no record, or one we cannot read: the bitmask serves every pattern
    return (pattern.n, pattern.m) if pattern.is_nm else None


def _dense_shards(folder: Path) -> tuple[list[str], dict | None]:
    """The safetensors files of a dense folder in order, and its shard index's metadata (if sharded)."""
    index = folder / _DENSE_INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            files = list(dict.fromkeys(data["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index} is not a valid safetensors index: {exc}") from None
        return files, data.get("metadata") or {}
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"], None
    if is_sparse_folder(folder):
        raise UserError(f"{folder} is already a sparse folder")
    raise UserError(
        f"{folder} holds no model.safetensors (or shard index): pack takes a folder saved by "
        "save_pretrained or d2prune in safetensors format"
    )


def _save(tensors: dict, path: Path, metadata: dict[str, str] | None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates the file owner-only; save_pretrained's are world-readable


def _encode_shard(tensors, nm: tuple[int, int] | None, file: str, entries: dict[str, dict]) -> dict[str, Any]:
    """The stored tensors of one sparse shard ``file``; each tensor's index entry goes into ``entries``."""
    from d2prune.io.sparse_codec import SEP, encode

    out: dict[str, Any] = {}
    with _pool() as pool:
        jobs = [(name, t, pool.submit(encode, t, nm)) for name, t in tensors]
        for name, t, job in jobs:  # in the shard's order
            enc = job.result()
            if enc is None:
                out[name] = t
                entries[name] = {"layout": "dense", "file": file}
            else:
                parts, entry = enc
                out.update({f"{name}{SEP}{k}": v for k, v in parts.items()})
                entries[name] = {**entry, "file": file}
    return out


def _write_index(folder: Path, files: dict[str, str], metadata: dict | None, tensors: dict[str, dict]) -> dict:
    index = {"format": FORMAT, "version": VERSION, "files": files, "dense_index_metadata": metadata, "tensors": tensors}
    write_synced(folder / SPARSE_INDEX, json.dumps(index, indent=1) + "\n")
    write_synced(folder / _README, README_TEXT)
    return index


def sparsify_folder(folder: str | Path, nm: tuple[int, int] | None = None, src: str | Path | None = None) -> dict:
    """Write the sparse weights of the dense folder ``src`` (default: ``folder`` itself) into ``folder``
    and its ``model.sparse.json``; in place, each dense shard is deleted once converted. Returns the index."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    src = Path(src) if src is not None else folder
    files, metadata = _dense_shards(src)
    tensors: dict[str, dict] = {}
    for file in files:
        path = src / file
        try:
            with safe_open(str(path), framework="pt") as fh:
                shard_metadata = fh.metadata()
                out = _encode_shard(((n, fh.get_tensor(n)) for n in fh.keys()), nm, sparse_name(file), tensors)
        except (OSError, SafetensorError) as exc:
            raise UserError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}") from None
        _save(out, folder / sparse_name(file), shard_metadata)
        del out
        if src == folder:
            path.unlink()
    if src == folder:
        (folder / _DENSE_INDEX).unlink(missing_ok=True)
    return _write_index(folder, {sparse_name(f): f for f in files}, metadata, tensors)


def save_pretrained_sparse(model, folder: str | Path, nm: tuple[int, int] | None = None) -> dict:
    """``model.save_pretrained(folder)``, each shard written sparse as transformers hands it over.

    transformers' own shard contents (names, tied weights left out, dtype) are kept, without
    writing the dense shards first: its ``safe_save_file`` is swapped for the sparse writer for
    the duration of the call (d2prune saves from one thread). Should a transformers version write
    its shards another way, the dense shards it wrote are converted afterwards."""
    import transformers.modeling_utils as tm

    folder = Path(folder)
    tensors: dict[str, dict] = {}
    files: dict[str, str] = {}
    original = getattr(tm, "safe_save_file", None)

    def write_sparse(shard: dict, filename: str, metadata: dict | None = None) -> None:
        dense = Path(filename).name
        files[sparse_name(dense)] = dense
        out = _encode_shard(shard.items(), nm, sparse_name(dense), tensors)
        _save(out, Path(filename).parent / sparse_name(dense), metadata)

    if original is not None:
        tm.safe_save_file = write_sparse
    try:
        model.save_pretrained(folder)
    finally:
        if original is not None:
            tm.safe_save_file = original
    dense_left = [p for p in folder.glob("*.safetensors") if not p.name.endswith(".sparse.safetensors")]
    if not files or dense_left:
        for name in files:  # some shards went around the hook: start over from the dense files
            (folder / name).unlink(missing_ok=True)
        return sparsify_folder(folder, nm)
    metadata = None
    if (folder / _DENSE_INDEX).is_file():
        metadata = json.loads((folder / _DENSE_INDEX).read_text(encoding="utf-8")).get("metadata") or {}
        (folder / _DENSE_INDEX).unlink()
    return _write_index(folder, files, metadata, tensors)


def _copy_other_files(src: Path, dst: Path, skip) -> None:
    """Copy the top-level files of ``src`` that ``skip(name)`` does not claim (tokenizer, config, record)."""
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith(".") and not skip(p.name):
            shutil.copyfile(p, dst / p.name)


def _is_dense_weight(name: str) -> bool:
    """The weight files ``from_pretrained`` would read (other files, e.g. a tokenizer .bin, are copied)."""
    return (
        name.endswith(".safetensors")
        or (name.startswith("pytorch_model") and name.endswith(".bin"))
        or name in (_DENSE_INDEX, "pytorch_model.bin.index.json")
    )


def pack_folder(src: str | Path, dst: str | Path) -> Path:
    """Write the sparse form of the dense model folder ``src`` to ``dst`` (atomic; ``dst`` may be ``src``)."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise UserError(f"{src} is not a folder")
    if is_sparse_folder(src):
        raise UserError(f"{src} is already a sparse folder")
    if not (src / "config.json").is_file():
        raise UserError(f"{src} is not a model folder: no config.json")
    _dense_shards(src)  # fail before creating anything
    dst = prepare_folder_target(dst)
    with atomic_folder(dst) as tmp:
        _copy_other_files(src, tmp, lambda n: _is_dense_weight(n) or n == _README)
        sparsify_folder(tmp, nm_of_record(src), src=src)
    return dst


def read_index(folder: str | Path) -> dict:
    """The validated ``model.sparse.json`` of a sparse folder; anything else is a UserError."""
    folder = Path(folder).expanduser()
    path = folder / SPARSE_INDEX
    if not path.is_file():
        raise UserError(f"{folder} is not a sparse model folder: no {SPARSE_INDEX}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a valid sparse index: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise UserError(f"{path} has format version {index.get('version')}; this d2prune reads version {VERSION}")
    if not isinstance(index.get("tensors"), dict) or not isinstance(index.get("files"), dict):
        raise UserError(f"{path} is not a valid sparse index: no tensors or files")
    from d2prune.io.sparse_codec import check_entry

    for name, entry in index["tensors"].items():
        check_entry(name, entry)
        if entry["file"] not in index["files"]:
            raise UserError(f"{path}: {name} is in {entry['file']}, which the index does not list")
    return index


def _mapped_parts(path: Path):
    """``part(key)``: a stored tensor of the safetensors file ``path`` as a zero-copy view of a
    private (copy-on-write) memory map. The codec's parts are read once, so copying them out first,
    as ``safe_open.get_tensor`` does, costs a quarter of a decode. The header's offsets are checked
    against the shapes and the file by ``io.integrity.safetensors_header``."""
    import mmap
    import struct

    import numpy as np
    import torch

    from d2prune.io.integrity import safetensors_header, safetensors_torch_dtype

    header = safetensors_header(path)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    data = np.frombuffer(mapped, np.uint8)
    base = 8 + struct.unpack("<Q", data[:8].tobytes())[0]

    def part(key: str) -> torch.Tensor:
        info = header[key]
        dtype = safetensors_torch_dtype(info["dtype"])
        first, last = (int(x) for x in info["data_offsets"])
        return torch.from_numpy(data[base + first : base + last]).view(dtype).reshape(info["shape"])

    return part


def read_shard(folder: Path, file: str, entries: dict[str, dict]) -> dict[str, Any]:
    """The dense tensors ``entries`` (name → index entry) stored in the sparse shard ``file``."""
    from safetensors import safe_open

    from d2prune.io.sparse_codec import SEP, decode

    path = folder / file
    out: dict[str, Any] = {}
    try:
        # safe_open validates the whole header (and reads the dense tensors); the codec's parts come
        # from the map.
        with safe_open(str(path), framework="pt") as fh, _pool() as pool:
            keys = set(fh.keys())
            part = _mapped_parts(path)
            pending = {}
            for name, entry in entries.items():
                if entry["layout"] == "dense":
                    out[name] = fh.get_tensor(name)
                    continue
                wanted = ("values", "mask") if entry["layout"] == "bitmask" else ("values", "index")
                parts = {k: part(f"{name}{SEP}{k}") for k in wanted if f"{name}{SEP}{k}" in keys}
                if len(parts) != len(wanted):
                    raise ValueError(f"{name}: stored parts missing")
                pending[name] = pool.submit(decode, entry, parts)
            out.update({name: job.result() for name, job in pending.items()})
    except Exception as exc:  # safetensors' SafetensorError, a damaged header or body, a part that does not fit
        raise UserError(f"{path} is damaged or not a d2prune sparse file: {str(exc).splitlines()[0][:200]}") from None
    return out


def _pool():
    """Threads for the codec: numpy and torch release the GIL in its bulk operations."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))


def _by_file(index: dict) -> dict[str, dict[str, dict]]:
    grouped: dict[str, dict[str, dict]] = {f: {} for f in index["files"]}
    for name, entry in index["tensors"].items():
        grouped[entry["file"]][name] = entry
    return grouped


def read_state_dict(folder: str | Path) -> dict[str, Any]:
    """Every tensor of a sparse folder, dense, as the dense save held it."""
    folder = Path(folder).expanduser()
    state: dict[str, Any] = {}
    for file, entries in _by_file(read_index(folder)).items():
        state.update(read_shard(folder, file, entries))
    return state


def _file_metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:  # read_shard has checked the file already
        return fh.metadata()


def unpack_folder(src: str | Path, dst: str | Path) -> Path:
    """Write the plain dense folder (``from_pretrained`` loads it) of the sparse folder ``src`` to ``dst``."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise UserError(f"{src} is not a folder")
    index = read_index(src)
    dst = prepare_folder_target(dst)
    with atomic_folder(dst) as tmp:
        weight_map = {}
        for file, entries in _by_file(index).items():
            tensors = read_shard(src, file, entries)
            dense = index["files"][file]
            _save({k: v.contiguous() for k, v in tensors.items()}, tmp / dense, _file_metadata(src / file))
            weight_map.update({name: dense for name in entries})
            del tensors
        if index.get("dense_index_metadata") is not None:
            body = {"metadata": index["dense_index_metadata"], "weight_map": dict(sorted(weight_map.items()))}
            write_synced(tmp / _DENSE_INDEX, json.dumps(body, indent=2) + "\n")
        _copy_other_files(src, tmp, lambda name: is_sparse_file(src / name) or _is_dense_weight(name))
    return dst
