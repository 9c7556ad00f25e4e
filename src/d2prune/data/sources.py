"""Where data sources live: known names (with their local file and Hub fallback), paths, Hub ids.

Sources are given by name (``c4``, ``wikitext2``, ``ptb``: see ``KNOWN_SOURCES``) or by path (json
lines, parquet, a ``datasets.save_to_disk`` folder, a folder of such files, or any plain-text file).
A name whose local file is missing falls back to the Hugging Face Hub. Nothing here reads a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from d2prune.errors import UserError

Purpose = Literal["calibration", "eval"]


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


def has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    """Whether the file name ends with one of ``suffixes`` (case-insensitive; ``.json.gz`` counts)."""
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
        if data_files_in(path):
            return ResolvedSource(name, "files", "docs", purpose, path=path, known=known)
        raise UserError(
            f"data folder {path} is neither a datasets.save_to_disk folder nor holds .json/.jsonl/.json.gz/.parquet files"
        )
    if has_suffix(path, _JSON_SUFFIXES):
        return ResolvedSource(name, "json", "docs", purpose, path=path, known=known)
    if has_suffix(path, (".parquet",)):
        return ResolvedSource(name, "parquet", "docs", purpose, path=path, known=known)
    layout, text_known = _text_layout(path)
    return ResolvedSource(name, "text", layout, purpose, path=path, known=known or text_known)


def resolve_source(name_or_path: str, data_dir: Path | None = None, purpose: Purpose | None = None) -> ResolvedSource:
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
        return ResolvedSource(
            raw, "hub", layout, purpose, hub=hub, known=key, tried=(local.resolve(), folder.resolve())
        )

    path = Path(raw).expanduser()
    if path.exists():
        return _local_source(raw, path, purpose, None)
    # Hub ids look like "name" or "owner/name"; anything else that does not exist is a missing file.
    if raw.startswith((".", "/", "~")) or has_suffix(path, _PATHLIKE_SUFFIXES) or raw.count("/") > 1:
        raise UserError(f"data file not found: {path.resolve()} (known names: {', '.join(KNOWN_SOURCES)})")
    split = "train" if purpose == "calibration" else "test"
    return ResolvedSource(raw, "hub", "docs", purpose, hub=HubSpec(raw, split=split), tried=(path.resolve(),))


def data_files_in(folder: Path) -> list[Path]:
    """The json / parquet data files under ``folder``, in sorted order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and has_suffix(p, _DATA_FILE_SUFFIXES))
