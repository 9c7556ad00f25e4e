"""Calibration and evaluation data: find the text, tokenize it, draw windows, cache the result.

No pruning logic lives here. The draw of calibration windows reproduces the SparseGPT / Wanda /
D²Prune C4 loader bit for bit (same random sequence, same acceptance rule), so that a seed means the
same windows as in the reference code when the documents and the tokenizer are the same.

Sources are given by name (``c4``, ``wikitext2``, ``ptb``: see ``KNOWN_SOURCES``) or by path (json
lines, parquet, a ``datasets.save_to_disk`` folder, a folder of such files, or any plain-text file).
A name whose local file is missing falls back to the Hugging Face Hub.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import torch

from d2prune.errors import UserError

log = logging.getLogger(__name__)

Purpose = Literal["calibration", "eval"]

#: Bump when the cached content for an unchanged key would change (a new draw rule, a new join rule).
CACHE_FORMAT_VERSION = 1

#: The reference loaders evaluate C4 on the first 1100 validation documents joined with " ".
C4_EVAL_DOCS = 1100


@dataclass(frozen=True)
class HubSpec:
    """Arguments for ``datasets.load_dataset`` and the column that holds the text."""

    path: str
    name: str | None = None
    data_files: dict[str, str] | None = None
    split: str = "train"
    column: str = "text"

    def ident(self) -> str:
        """A stable one-line id, used in run records and cache keys."""
        parts = [self.path]
        if self.name:
            parts.append(self.name)
        if self.data_files:
            parts.append(",".join(f"{k}={v}" for k, v in sorted(self.data_files.items())))
        return "hub:" + ":".join(parts) + f"[{self.split}]"


# Per known name: the local file (relative to the data dir) and the hub fallback, for each purpose.
# Calibration for wikitext2/ptb uses the train split like the reference loaders; only the test files
# are shipped in shared/data, so those fall back to the hub unless a train file is dropped in.
_KNOWN: dict[str, dict[str, tuple[str, HubSpec]]] = {
    "c4": {
        "calibration": (
            "c4/c4_validation_2k.parquet",
            HubSpec("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"),
        ),
        "eval": (
            "c4/c4_validation_2k.parquet",
            HubSpec(
                "allenai/c4",
                data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                split="validation",
            ),
        ),
    },
    "wikitext2": {
        "calibration": ("wikitext2/wiki.train.raw", HubSpec("wikitext", "wikitext-2-raw-v1", split="train")),
        "eval": ("wikitext2/wiki.test.raw", HubSpec("wikitext", "wikitext-2-raw-v1", split="test")),
    },
    "ptb": {
        "calibration": (
            "ptb/ptb.train.txt",
            HubSpec("ptb_text_only", "penn_treebank", split="train", column="sentence"),
        ),
        "eval": ("ptb/ptb.test.txt", HubSpec("ptb_text_only", "penn_treebank", split="test", column="sentence")),
    },
}
KNOWN_SOURCES: tuple[str, ...] = tuple(_KNOWN)

_DEFAULT_PURPOSE: dict[str, Purpose] = {"c4": "calibration", "wikitext2": "eval", "ptb": "eval"}

_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_DATA_FILE_SUFFIXES = _JSON_SUFFIXES + (".parquet",)
# Suffixes that make a string clearly a file path, so a typo is reported as a missing file at once
# instead of being sent to the hub.
_PATHLIKE_SUFFIXES = _DATA_FILE_SUFFIXES + (".txt", ".raw", ".tokens", ".arrow", ".gz")

# Layouts: how texts become eval text and calibration documents.
#   "docs":     one text per document (C4-like); eval joins them with "\n\n".
#   "wikitext": rows of WikiText (lines, "" for blank lines); eval is "\n\n".join(rows).
#   "ptb":      one sentence per row; eval is "\n\n".join(sentences).
#   "plain":    a single text; eval is the text itself.
Layout = Literal["docs", "wikitext", "ptb", "plain"]


@dataclass(frozen=True)
class ResolvedSource:
    """Where a data source lives and how to read it. Built by :func:`resolve_source`."""

    name: str  # the name or path as the user gave it
    kind: Literal["json", "parquet", "hf_disk", "files", "text", "hub"]
    layout: Layout
    purpose: Purpose
    path: Path | None = None
    hub: HubSpec | None = None
    known: str | None = None  # "c4" / "wikitext2" / "ptb" when the name or file is one of those
    tried: tuple[Path, ...] = field(default=())  # local paths looked at before the hub fallback

    @property
    def location(self) -> str:
        """The resolved path, or the hub id."""
        return str(self.path) if self.path is not None else self.hub.ident()  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# Locating data


def default_data_dir() -> Path:
    """The shared data folder: ``$D2PRUNE_DATA``, else ``<project>/../shared/data``, else ``./../shared/data``.

    When no candidate exists the first one is returned; readers then report the missing file.
    """
    env = os.environ.get("D2PRUNE_DATA")
    if env:
        return Path(env).expanduser()
    candidates = [
        Path(__file__).resolve().parents[2] / ".." / "shared" / "data",
        Path.cwd() / ".." / "shared" / "data",
    ]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    return candidates[0].resolve()


def _is_hf_disk(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _text_layout(path: Path) -> tuple[Layout, str | None]:
    # The canonical files keep their canonical join rule when given by path, so that a path and the
    # matching name give the same tokens.
    name = path.name.lower()
    if name.startswith("wiki.") and (name.endswith(".raw") or name.endswith(".tokens")):
        return "wikitext", "wikitext2"
    if name.startswith("ptb.") and name.endswith(".txt"):
        return "ptb", "ptb"
    return "plain", None


def _local_source(name: str, path: Path, purpose: Purpose, known: str | None) -> ResolvedSource:
    path = path.resolve()
    if path.is_dir():
        if _is_hf_disk(path):
            layout: Layout = {"wikitext2": "wikitext", "ptb": "ptb"}.get(known or "", "docs")  # type: ignore[assignment]
            return ResolvedSource(name, "hf_disk", layout, purpose, path=path, known=known)
        if _data_files_in(path):
            return ResolvedSource(name, "files", "docs", purpose, path=path, known=known)
        raise UserError(
            f"data folder {path} is neither a datasets.save_to_disk folder nor holds .json/.jsonl/.json.gz/.parquet files"
        )
    if _has_suffix(path, _JSON_SUFFIXES):
        return ResolvedSource(name, "json", "docs", purpose, path=path, known=known)
    if _has_suffix(path, (".parquet",)):
        return ResolvedSource(name, "parquet", "docs", purpose, path=path, known=known)
    layout, text_known = _text_layout(path)
    return ResolvedSource(name, "text", layout, purpose, path=path, known=known or text_known)


def resolve_source(
    name_or_path: str, data_dir: Path | None = None, purpose: Purpose | None = None
) -> ResolvedSource:
    """Find a data source. Reads nothing but the file system; the hub is only contacted on load.

    ``purpose`` picks the split for known names ("calibration": train-like data, "eval": test data);
    None means the name's usual role (c4 calibrates, wikitext2 and ptb evaluate).
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise UserError(f"data source must be a name ({', '.join(KNOWN_SOURCES)}) or a path, got {name_or_path!r}")
    raw = str(name_or_path).strip()
    key = raw.lower()
    if purpose is None:
        purpose = _DEFAULT_PURPOSE.get(key, "calibration")
    if purpose not in ("calibration", "eval"):
        raise ValueError(f"purpose must be 'calibration' or 'eval', got {purpose!r}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()

    if key in _KNOWN:
        rel, hub = _KNOWN[key][purpose]
        local = data_dir / rel
        if local.is_file():
            res = _local_source(raw, local, purpose, key)
            layout: Layout = {"c4": "docs", "wikitext2": "wikitext", "ptb": "ptb"}[key]  # type: ignore[assignment]
            return ResolvedSource(raw, res.kind, layout, purpose, path=res.path, known=key)
        folder = data_dir / key
        if _is_hf_disk(folder):
            return _local_source(raw, folder, purpose, key)
        layout = {"c4": "docs", "wikitext2": "wikitext", "ptb": "ptb"}[key]  # type: ignore[assignment]
        return ResolvedSource(raw, "hub", layout, purpose, hub=hub, known=key, tried=(local.resolve(), folder.resolve()))

    path = Path(raw).expanduser()
    if path.exists():
        return _local_source(raw, path, purpose, None)
    # Hub ids look like "name" or "owner/name"; anything else that does not exist is a missing file.
    if raw.startswith((".", "/", "~")) or _has_suffix(path, _PATHLIKE_SUFFIXES) or raw.count("/") > 1:
        raise UserError(f"data file not found: {path.resolve()} (known names: {', '.join(KNOWN_SOURCES)})")
    split = "train" if purpose == "calibration" else "test"
    return ResolvedSource(raw, "hub", "docs", purpose, hub=HubSpec(raw, split=split), tried=(path.resolve(),))


# --------------------------------------------------------------------------------------------------
# Reading texts


def _data_files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _has_suffix(p, _DATA_FILE_SUFFIXES))


def parse_json_lines(lines, path: Path) -> list:
    """One JSON value per non-blank line; a bad line is a UserError naming ``path:line``."""
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
    return records


def _read_json_texts(path: Path, column: str = "text") -> list[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        content = f.read()
    stripped = content.lstrip()
    if stripped.startswith("["):  # a plain JSON array, not json lines
        try:
            records = json.loads(content)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    else:
        records = parse_json_lines(content.splitlines(), path)
    texts = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or column not in rec:
            raise UserError(f"{path}: record {i + 1} has no {column!r} field")
        if rec[column] is not None:
            texts.append(str(rec[column]))
    return texts


def _read_parquet_texts(path: Path, column: str = "text") -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema_names = pq.read_schema(path).names
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from None
    if column not in schema_names:
        raise UserError(f"{path}: no {column!r} column (columns: {', '.join(schema_names)})")
    return [t for t in pq.read_table(path, columns=[column]).column(column).to_pylist() if t is not None]


def _pick_column(names: list[str], where: str) -> str:
    for col in ("text", "sentence"):
        if col in names:
            return col
    raise UserError(f"{where}: no 'text' column (columns: {', '.join(names)})")


def _read_hf_disk_texts(path: Path, purpose: Purpose) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot load with datasets.load_from_disk ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        wanted = "train" if purpose == "calibration" else "test"
        if wanted in ds:
            ds = ds[wanted]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise UserError(f"{path}: has splits {', '.join(ds)} but no {wanted!r} split for {purpose}")
    col = _pick_column(list(ds.column_names), str(path))
    return [t for t in ds[col] if t is not None]


def _read_plain(path: Path) -> str:
    # Universal newlines (Python's default): a CRLF copy reads the same as the LF original.
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _split_lines(text: str) -> list[str]:
    """Lines as ``for line in file`` yields them: each keeps its "\\n", no empty tail."""
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def _is_wikitext_heading(line: str) -> bool:
    s = line.rstrip("\n")
    return s.startswith(" = ") and s.endswith(" = ")


def wikitext_rows_from_raw(text: str) -> list[str]:
    """The rows of HF ``wikitext`` (``{"text": line}``, ``""`` for a blank line) rebuilt from a raw file.

    The original ``wiki.*.raw`` has one line per row, blank rows as " " lines: that is rebuilt
    exactly. The copy in shared/data is ``"".join(rows)`` (CRLF), so its blank rows are gone; there
    a blank row is put before and after each heading line (" = ... = "), which is where WikiText has
    them. That restores 1412 of the test split's 1467 blank rows (4303 of 4358 rows); the other 55
    are not recorded in that file. Each blank row adds one "\\n\\n" to the joined text.
    """
    lines = _split_lines(text)
    if any(not line.strip() for line in lines):
        return [line if line.strip() else "" for line in lines]
    rows: list[str] = []
    for line in lines:
        if _is_wikitext_heading(line):
            rows += ["", line, ""]
        else:
            rows.append(line)
    return rows


def _load_hub(spec: HubSpec) -> list[str]:
    import datasets

    kwargs: dict[str, Any] = {"split": spec.split}
    if spec.data_files:
        kwargs["data_files"] = spec.data_files
    if spec.name:
        ds = datasets.load_dataset(spec.path, spec.name, **kwargs)
    else:
        ds = datasets.load_dataset(spec.path, **kwargs)
    col = spec.column if spec.column in ds.column_names else _pick_column(list(ds.column_names), spec.ident())
    return [t for t in ds[col] if t is not None]


@dataclass
class _Corpus:
    texts: list[str]
    layout: Layout
    known: str | None


def _load_corpus(src: ResolvedSource) -> _Corpus:
    if src.kind == "hub":
        assert src.hub is not None
        log.info("loading %s from the Hugging Face Hub", src.hub.ident())
        try:
            texts = _load_hub(src.hub)
        except Exception as e:  # noqa: BLE001 - offline, missing repo, bad config: all the user's to fix
            tried = " or ".join(str(p) for p in src.tried) or "no local file"
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(
                f"data source {src.name!r} not found: looked for {tried}, then the Hugging Face Hub "
                f"({src.hub.ident()}) could not be loaded ({type(e).__name__}: {first[:200]})"
            ) from None
        return _Corpus(texts, src.layout, src.known)
    assert src.path is not None
    if not src.path.exists():
        raise UserError(f"data file not found: {src.path}")
    if src.kind == "json":
        texts = _read_json_texts(src.path)
    elif src.kind == "parquet":
        texts = _read_parquet_texts(src.path)
    elif src.kind == "hf_disk":
        texts = _read_hf_disk_texts(src.path, src.purpose)
    elif src.kind == "files":
        texts = []
        for p in _data_files_in(src.path):
            texts += _read_parquet_texts(p) if _has_suffix(p, (".parquet",)) else _read_json_texts(p)
    else:
        content = _read_plain(src.path)
        if src.layout == "wikitext":
            return _Corpus(wikitext_rows_from_raw(content), "wikitext", src.known)
        if src.layout == "ptb":
            # As HF ptb_text_only builds its rows: one stripped line per sentence.
            return _Corpus([line.strip() for line in _split_lines(content)], "ptb", src.known)
        return _Corpus([content], "plain", src.known)
    return _Corpus(texts, src.layout, src.known)


def _eval_text(corpus: _Corpus) -> str:
    if corpus.layout == "plain":
        return corpus.texts[0]
    if corpus.known == "c4" and corpus.layout == "docs":
        return " ".join(corpus.texts[:C4_EVAL_DOCS])
    return "\n\n".join(corpus.texts)


def _calibration_docs(corpus: _Corpus) -> tuple[list[str], str | None]:
    """Documents to draw from, and the whole text to fall back on when no document is long enough."""
    if corpus.layout == "docs":
        return corpus.texts, None
    text = _eval_text(corpus)
    docs = [d for d in text.split("\n\n") if d.strip()]
    return docs, text


# --------------------------------------------------------------------------------------------------
# Fingerprints and cache


def _sha256_file(path: Path, h: "hashlib._Hash | None" = None) -> "hashlib._Hash":
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
    ident: dict[str, Any] = {"name": src.name.lower() if src.known else src.name, "layout": src.layout,
                             "kind": src.kind, "purpose": src.purpose}
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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"input_ids": tensor.contiguous()}, tmp, metadata={"key": key_json})
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache is shared like any other file
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        # A read-only or full cache folder must not fail the run: the data is already in memory.
        log.warning("cannot write cache file %s (%s)", path, e)


# --------------------------------------------------------------------------------------------------
# Calibration windows


class _NoWindows(Exception):
    def __init__(self, n_docs: int, total_tokens: int, longest: int):
        super().__init__()
        self.n_docs, self.total_tokens, self.longest = n_docs, total_tokens, longest


def _draw_windows(tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int, label: str) -> torch.Tensor:
    """The reference draw: pick documents until one has more than seqlen tokens, then a random start."""
    return _draw(tokenizer, docs, nsamples, seqlen, seed, label)[0]


def _draw(
    tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int, label: str, exclude: frozenset[int] = frozenset()
) -> tuple[torch.Tensor, set[int]]:
    """``_draw_windows`` that never picks a document in ``exclude``; also returns the documents used."""
    if not docs or len(exclude) >= len(docs):
        raise _NoWindows(0, 0, 0)
    # Each document is tokenized at most once; short ones only keep their length.
    memo: dict[int, torch.Tensor | int] = {}

    def ids_of(i: int) -> torch.Tensor | int:
        if i not in memo:
            ids = tokenizer(docs[i], return_tensors="pt", verbose=False).input_ids
            memo[i] = ids if ids.shape[1] > seqlen else int(ids.shape[1])
        return memo[i]

    # Make sure a long enough document exists before the open-ended draw loop below; stop scanning
    # as soon as the documents seen could give nsamples disjoint windows.
    capacity = n_long = total = longest = 0
    for i in range(len(docs)):
        if i in exclude:
            continue
        ids = ids_of(i)
        n = ids if isinstance(ids, int) else int(ids.shape[1])
        total += n
        longest = max(longest, n)
        if not isinstance(ids, int):
            n_long += 1
            capacity += n // seqlen
            if capacity >= nsamples:
                break
    if n_long == 0:
        raise _NoWindows(len(docs), total, longest)
    if capacity < nsamples:
        warnings.warn(
            f"data source {label!r} can make only {capacity} disjoint windows of {seqlen} tokens "
            f"({n_long} documents longer than {seqlen}); the {nsamples} drawn windows will overlap",
            stacklevel=3,
        )

    # random.Random(seed) gives the same numbers as random.seed(seed) + random.randint without
    # touching the global generator.
    rng = random.Random(seed)
    out = []
    used: set[int] = set()
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(docs) - 1)
            if index in exclude:
                continue
            ids = ids_of(index)
            if not isinstance(ids, int):  # only documents with more than seqlen tokens keep ids
                break
        used.add(index)
        start = rng.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[:, start : start + seqlen])
    return torch.cat(out, dim=0).long(), used


def _check_positive(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")


def get_calibration(
    tokenizer,
    source: str = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    data_dir: Path | None = None,
    cache_dir: Path | None | bool = None,
) -> torch.LongTensor:
    """``nsamples`` calibration windows of ``seqlen`` tokens, shape (nsamples, seqlen), drawn as the
    SparseGPT/Wanda C4 loader draws them (see module docstring).

    Document sources (C4, json, parquet, datasets folders) draw from their documents; text sources
    (plain files, wikitext2, ptb) draw from blank-line separated paragraphs, or from the whole text as
    one document when no paragraph is longer than ``seqlen``. ``cache_dir=False`` disables the cache.
    """
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}")
    src = resolve_source(source, data_dir, "calibration")

    def draw() -> torch.Tensor:
        docs, whole = _calibration_docs(_load_corpus(src))
        try:
            try:
                return _draw_windows(tokenizer, docs, nsamples, seqlen, seed, src.name)
            except _NoWindows:
                if whole is None or len(docs) <= 1:
                    raise
                return _draw_windows(tokenizer, [whole], nsamples, seqlen, seed, src.name)
        except _NoWindows as e:
            raise UserError(
                f"data source {src.name!r} ({src.location}) can make 0 calibration windows of {seqlen} tokens "
                f"(need {nsamples}): none of its {e.n_docs} documents has more than {seqlen} tokens "
                f"(longest {e.longest}, {e.total_tokens} tokens in all); use a shorter seqlen or more data"
            ) from None

    key = {"kind": "calibration", "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    return _cached(cache_dir, "calib", src, tokenizer, key, draw)


def get_heldout(
    tokenizer,
    source: str = "c4",
    nsamples: int = 16,
    seqlen: int = 2048,
    calib_nsamples: int = 128,
    calib_seed: int = 0,
    seed: int = 1,
    data_dir: Path | None = None,
) -> torch.LongTensor:
    """``nsamples`` windows of ``seqlen`` tokens from documents of ``source`` that the calibration
    draw (``calib_nsamples``, ``seqlen``, ``calib_seed``) did not touch: held-out text for choosing
    hyper-parameters without looking at the calibration windows or the evaluation text."""
    _check_positive(nsamples=nsamples, seqlen=seqlen, calib_nsamples=calib_nsamples)
    src = resolve_source(source, data_dir, "calibration")
    docs, _ = _calibration_docs(_load_corpus(src))
    try:
        _, used = _draw(tokenizer, docs, calib_nsamples, seqlen, calib_seed, src.name)
        windows, _ = _draw(tokenizer, docs, nsamples, seqlen, seed, src.name, exclude=frozenset(used))
    except _NoWindows:
        raise UserError(
            f"data source {src.name!r} ({src.location}) has no document of more than {seqlen} tokens "
            f"left after the {calib_nsamples} calibration windows; held-out windows need separate documents"
        ) from None
    return windows


# --------------------------------------------------------------------------------------------------
# Evaluation tokens


def get_eval_tokens(
    tokenizer,
    source: str = "wikitext2",
    data_dir: Path | None = None,
    cache_dir: Path | None | bool = None,
) -> torch.LongTensor:
    """The whole evaluation text tokenized once, shape (1, n_tokens).

    wikitext2: ``"\\n\\n".join`` of the HF test rows (rebuilt from the raw file, see
    :func:`wikitext_rows_from_raw`); ptb: ``"\\n\\n".join`` of the test sentences; c4: the first 1100
    documents joined with " " (SparseGPT's C4 eval; it then uses 256 windows: ``max_windows=256``);
    other document sources: texts joined with "\\n\\n"; a plain-text file: its content as is.
    """
    src = resolve_source(source, data_dir, "eval")

    def tokenize() -> torch.Tensor:
        text = _eval_text(_load_corpus(src))
        if not text.strip():
            raise UserError(f"data source {src.name!r} ({src.location}) holds no text to evaluate on")
        return tokenizer(text, return_tensors="pt", verbose=False).input_ids.long()

    return _cached(cache_dir, "eval", src, tokenizer, {"kind": "eval"}, tokenize)


def _cached(cache_dir, prefix: str, src: "ResolvedSource", tokenizer, key: dict, compute) -> torch.Tensor:
    """``compute()``, through the on-disk cache under a key of tokenizer, source and ``key``."""
    cdir = _cache_dir(cache_dir)
    if cdir is None:
        return compute()
    full_key = {"version": CACHE_FORMAT_VERSION, **key, "tokenizer": tokenizer_identity(tokenizer),
                "source": _source_identity(src)}
    path, key_json = _cache_path(cdir, prefix, src, full_key)
    cached = _cache_load(path, key_json)
    if cached is not None:
        log.info("%s tokens from cache %s", key["kind"], path)
        return cached
    result = compute()
    _cache_save(path, key_json, result)
    return result


# --------------------------------------------------------------------------------------------------
# Fine-tuning text


def get_train_blocks(
    tokenizer,
    source: str = "c4",
    block_size: int = 1024,
    max_samples: int | None = None,
    data_dir: Path | None = None,
    cache_dir: Path | None | bool = None,
) -> torch.LongTensor:
    """Training blocks for LoRA fine-tuning, shape (n_blocks, block_size), as HF ``run_clm`` makes them.

    Every document of ``source`` (its training-like split, as for calibration) is tokenized with the
    tokenizer's own special tokens, the ids are concatenated in document order and cut into
    ``block_size`` chunks (tail dropped); the first ``max_samples`` chunks are kept (all if None).
    """
    _check_positive(block_size=block_size)
    if max_samples is not None:
        _check_positive(max_samples=max_samples)
    src = resolve_source(source, data_dir, "calibration")

    def blocks() -> torch.Tensor:
        docs, _ = _calibration_docs(_load_corpus(src))
        ids: list[int] = []
        needed = None if max_samples is None else max_samples * block_size
        for doc in docs:
            ids.extend(tokenizer(doc, verbose=False)["input_ids"])
            if needed is not None and len(ids) >= needed:  # stop tokenizing once there is enough
                break
        n = len(ids) // block_size
        if n == 0:
            raise UserError(
                f"data source {src.name!r} ({src.location}) holds {len(ids)} tokens, fewer than one block of "
                f"{block_size}; use a smaller block size or more data"
            )
        if max_samples is not None:
            n = min(n, max_samples)
        return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)

    key = {"kind": "train-blocks", "block_size": block_size, "max_samples": max_samples}
    return _cached(cache_dir, "train", src, tokenizer, key, blocks)
