"""Reading the texts of a resolved source: json lines, parquet, datasets folders, plain text, the Hub;
and turning them into evaluation text and calibration documents as the reference loaders do."""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2prune.data.sources import HubSpec, Layout, Purpose, ResolvedSource, data_files_in, has_suffix
from d2prune.errors import UserError

log = logging.getLogger(__name__)

#: The reference loaders evaluate C4 on the first 1100 validation documents joined with " ".
C4_EVAL_DOCS = 1100


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
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            content = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut .gz file ends early
        raise UserError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
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
    except OSError as e:  # unreadable, or a folder where a file was expected
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


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
class Corpus:
    """The texts of a source, with the layout that says how they join into eval text."""

    texts: list[str]
    layout: Layout
    known: str | None


def load_corpus(src: ResolvedSource) -> Corpus:
    """Read every text of ``src``; a missing file or an unreachable Hub source is a UserError."""
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
        return Corpus(texts, src.layout, src.known)
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
        for p in data_files_in(src.path):
            texts += _read_parquet_texts(p) if has_suffix(p, (".parquet",)) else _read_json_texts(p)
    else:
        content = _read_plain(src.path)
        if src.layout == "wikitext":
            return Corpus(wikitext_rows_from_raw(content), "wikitext", src.known)
        if src.layout == "ptb":
            # As HF ptb_text_only builds its rows: one stripped line per sentence.
            return Corpus([line.strip() for line in _split_lines(content)], "ptb", src.known)
        return Corpus([content], "plain", src.known)
    return Corpus(texts, src.layout, src.known)


def eval_text(corpus: Corpus) -> str:
    """The evaluation text, joined as the reference loaders join it (see ``get_eval_tokens``)."""
    if corpus.layout == "plain":
        return corpus.texts[0]
    if corpus.known == "c4" and corpus.layout == "docs":
        return " ".join(corpus.texts[:C4_EVAL_DOCS])
    return "\n\n".join(corpus.texts)


def calibration_docs(corpus: Corpus) -> tuple[list[str], str | None]:
    """Documents to draw from, and the whole text to fall back on when no document is long enough."""
    if corpus.layout == "docs":
        return corpus.texts, None
    text = eval_text(corpus)
    docs = [d for d in text.split("\n\n") if d.strip()]
    return docs, text
