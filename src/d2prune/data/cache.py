"""Fingerprints of sources and tokenizers (for run records and cache keys), and the on-disk token cache.

Token tensors are cached as safetensors under ``$D2PRUNE_CACHE`` (default ``~/.cache/d2prune``),
keyed by the tokenizer, the source's files and the request; the full key is stored in the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from d2prune.data.sources import Purpose, ResolvedSource, resolve_source
from d2prune.io.atomic import atomic_path

log = logging.getLogger(__name__)

#: Bump when the cached content for an unchanged key would change (a new draw rule, a new join rule).
CACHE_FORMAT_VERSION = 1


def _sha256_file(path: Path, h: hashlib._Hash | None = None) -> hashlib._Hash:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


_SHA_MEMO: dict[tuple[str, tuple], str] = {}


def _stat_ident(path: Path) -> list:
    """(relative path, size, mtime_ns) of the file, or of every file under the folder."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    out = []
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        st = p.stat()
        out.append([p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def sha256_path(path: Path) -> str:
    """sha256 of a file; for a folder, of each file's relative path and bytes in sorted order."""
    path = Path(path).resolve()
    memo_key = (str(path), tuple(tuple(x) for x in _stat_ident(path)))
    if memo_key in _SHA_MEMO:
        return _SHA_MEMO[memo_key]
    if path.is_file():
        digest = _sha256_file(path).hexdigest()
    else:
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            _sha256_file(p, h)
        digest = h.hexdigest()
    _SHA_MEMO[memo_key] = digest
    return digest


def source_info(source: str, data_dir: Path | None = None, *, purpose: Purpose | None = None) -> dict:
    """For the run record: ``{"source", "path", "sha256"}``; sha256 is None for a hub source."""
    src = resolve_source(source, data_dir, purpose)
    sha = sha256_path(src.path) if src.path is not None else None
    return {"source": src.name, "path": src.location, "sha256": sha}


def tokenizer_identity(tokenizer) -> dict:
    """What makes two tokenizers give different ids: name, size, full vocab/merges hash, a probe."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = None
    if backend is not None and hasattr(backend, "to_str"):
        try:
            blob = backend.to_str()
        except Exception:  # noqa: BLE001 - fall back to the vocab below
            blob = None
    if blob is None:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    # The probe catches settings outside the vocab, e.g. a slow tokenizer's add_bos_token.
    probe = tokenizer("Hello world.\n\n = A = \n x", return_tensors=None)["input_ids"]
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(),
        "probe": list(probe),
    }


def _source_identity(src: ResolvedSource) -> dict:
    ident: dict[str, Any] = {
        "name": src.name.lower() if src.known else src.name,
        "layout": src.layout,
        "kind": src.kind,
        "purpose": src.purpose,
    }
    if src.path is not None:
        ident["path"] = str(src.path)
        ident["files"] = _stat_ident(src.path)
    else:
        ident["hub"] = src.hub.ident()  # type: ignore[union-attr]
    return ident


def default_cache_dir() -> Path:
    """``$D2PRUNE_CACHE`` or ``~/.cache/d2prune``."""
    env = os.environ.get("D2PRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "d2prune"


def _cache_dir(cache_dir: Path | str | bool | None) -> Path | None:
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir).expanduser()


def _cache_path(cache_dir: Path, kind: str, src: ResolvedSource, key: dict) -> tuple[Path, str]:
    key_json = json.dumps(key, sort_keys=True, ensure_ascii=True)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:32]
    label = "".join(c if c.isalnum() else "_" for c in (src.known or Path(src.name).name))[:40]
    return cache_dir / f"{kind}-{label}-{digest}.safetensors", key_json


def _cache_load(path: Path, key_json: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            # The full key is stored, so a hash collision or a hand-copied file is never reused.
            if (f.metadata() or {}).get("key") != key_json:
                log.warning("cache file %s has a different key; recomputing", path)
                return None
            return f.get_tensor("input_ids")
    except Exception as e:  # noqa: BLE001 - a torn or foreign file is recomputed, not fatal
        log.warning("cannot read cache file %s (%s); recomputing", path, e)
        return None


def _cache_save(path: Path, key_json: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import save_file

    try:
        # Atomic: readers see the old file or the whole new one. safetensors makes the file owner-only;
        # a cache is shared like any other file.
        with atomic_path(path, mode=0o644) as tmp:
            save_file({"input_ids": tensor.contiguous()}, str(tmp), metadata={"key": key_json})
    except OSError as e:
        # A read-only or full cache folder must not fail the run: the data is already in memory.
        log.warning("cannot write cache file %s (%s)", path, e)


def cached(
    cache_dir: Path | str | bool | None,
    prefix: str,
    src: ResolvedSource,
    tokenizer,
    key: dict,
    compute: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``compute()``, through the on-disk cache under a key of tokenizer, source and ``key``."""
    cdir = _cache_dir(cache_dir)
    if cdir is None:
        return compute()
    full_key = {
        "version": CACHE_FORMAT_VERSION,
        **key,
        "tokenizer": tokenizer_identity(tokenizer),
        "source": _source_identity(src),
    }
    path, key_json = _cache_path(cdir, prefix, src, full_key)
    hit = _cache_load(path, key_json)
    if hit is not None:
        log.info("%s tokens from cache %s", key["kind"], path)
        return hit
    result = compute()
    _cache_save(path, key_json, result)
    return result
