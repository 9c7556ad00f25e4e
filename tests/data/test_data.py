"""Tests for d2prune.data: sources, the calibration draw, eval tokens, the cache. CPU, offline."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import torch

from d2prune import data
from d2prune.data import readers, tokens
from d2prune.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT.parent / "shared" / "models" / "aidreams260K"
SHARED_DATA = ROOT.parent / "shared" / "data"

SEQLEN = 32


@pytest.fixture(scope="module")
def tok():
    if not (MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip(f"tiny test tokenizer missing: {MODEL_DIR}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Any hub access fails at once, as it does offline (without the 25 s of retries)."""

    def fail(spec):
        raise ConnectionError(f"offline test: {spec.ident()}")

    monkeypatch.setattr(readers, "_load_hub", fail)


WORDS = (
    "the cat sat on a mat while the dog ran in the park and a bird sang in the tall green tree "
    "one day a little girl found a red ball under the old bench near the river"
).split()


def make_docs(n: int = 12, seed: int = 0) -> list[str]:
    """Documents of mixed length: some far longer than SEQLEN tokens, some shorter; no blank lines."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        n_words = rng.choice([3, 8, 60, 150]) if i % 3 else 5
        docs.append(" ".join(rng.choice(WORDS) for _ in range(n_words)) + ".")
    docs[1] = " ".join(rng.choice(WORDS) for _ in range(200)) + "."  # at least one long document
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs), encoding="utf-8")
    return path


def write_json_gz(path: Path, docs: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def write_parquet(path: Path, docs: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path)
    return path


def write_hf_disk(path: Path, docs: list[str], dict_split: str | None = None) -> Path:
    import datasets

    ds = datasets.Dataset.from_dict({"text": docs})
    if dict_split is not None:
        other = datasets.Dataset.from_dict({"text": ["unrelated short text."] * 3})
        splits = {dict_split: ds, ("test" if dict_split == "train" else "train"): other}
        ds = datasets.DatasetDict(splits)
    ds.save_to_disk(str(path))
    return path


def reference_draw(tok, docs: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The SparseGPT/Wanda c4 loader, verbatim in its logic (global random, no memo)."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tok(docs[i], return_tensors="pt").input_ids
            if ids.shape[1] > seqlen:
                break
        start = random.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[:, start : start + seqlen])
    return torch.cat(out, 0)


# ----------------------------------------------------------------------------------------------
# Calibration draw


def test_draw_matches_reference_and_is_seeded(tok, tmp_path):
    docs = make_docs()
    src = str(write_jsonl(tmp_path / "d.jsonl", docs))
    a = data.get_calibration(tok, src, nsamples=8, seqlen=SEQLEN, seed=0, cache_dir=False)
    b = data.get_calibration(tok, src, nsamples=8, seqlen=SEQLEN, seed=0, cache_dir=False)
    c = data.get_calibration(tok, src, nsamples=8, seqlen=SEQLEN, seed=1, cache_dir=False)
    assert a.shape == (8, SEQLEN) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a, reference_draw(tok, docs, 8, SEQLEN, 0))
    assert torch.equal(c, reference_draw(tok, docs, 8, SEQLEN, 1))


def test_windows_are_slices_of_long_documents(tok, tmp_path):
    docs = make_docs()
    src = str(write_jsonl(tmp_path / "d.jsonl", docs))
    windows = data.get_calibration(tok, src, nsamples=10, seqlen=SEQLEN, seed=3, cache_dir=False)
    tokenized = [tok(d).input_ids for d in docs]
    long_docs = [ids for ids in tokenized if len(ids) > SEQLEN]
    assert long_docs and len(long_docs) < len(docs)  # the fixture has both kinds
    for w in windows.tolist():
        found = any(ids[s : s + SEQLEN] == w for ids in long_docs for s in range(0, len(ids) - SEQLEN))
        assert found, "window is not a contiguous slice of a document longer than seqlen"


def test_every_format_gives_the_same_windows(tok, tmp_path):
    docs = make_docs()
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", docs[:5])
    write_parquet(folder / "b.parquet", docs[5:])
    plain = tmp_path / "docs.txt"
    plain.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    sources = [
        write_jsonl(tmp_path / "d.jsonl", docs),
        write_json_gz(tmp_path / "d.json.gz", docs),
        write_parquet(tmp_path / "d.parquet", docs),
        write_hf_disk(tmp_path / "hf_ds", docs),
        write_hf_disk(tmp_path / "hf_dict", docs, dict_split="train"),
        folder,
        plain,
    ]
    expected = reference_draw(tok, docs, 6, SEQLEN, 5)
    for src in sources:
        got = data.get_calibration(tok, str(src), nsamples=6, seqlen=SEQLEN, seed=5, cache_dir=False)
        assert torch.equal(got, expected), src.name


def test_json_array_file(tok, tmp_path):
    docs = make_docs()
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")
    got = data.get_calibration(tok, str(path), nsamples=4, seqlen=SEQLEN, seed=0, cache_dir=False)
    assert torch.equal(got, reference_draw(tok, docs, 4, SEQLEN, 0))


def test_plain_text_without_long_paragraph_is_one_document(tok, tmp_path):
    paragraphs = [" ".join(WORDS[i : i + 4]) for i in range(0, 40, 4)]  # each far below SEQLEN tokens
    text = "\n\n".join(paragraphs)
    path = tmp_path / "short_paras.txt"
    path.write_text(text, encoding="utf-8")
    got = data.get_calibration(tok, str(path), nsamples=3, seqlen=SEQLEN, seed=0, cache_dir=False)
    assert torch.equal(got, reference_draw(tok, [text], 3, SEQLEN, 0))


def test_too_little_data_is_a_user_error_with_the_count(tok, tmp_path):
    docs = ["a short one.", "another short document.", "tiny."]
    with pytest.raises(UserError, match=r"can make 0 calibration windows of 32 tokens"):
        data.get_calibration(tok, str(write_jsonl(tmp_path / "s.jsonl", docs)), 4, SEQLEN, cache_dir=False)
    path = tmp_path / "s.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    with pytest.raises(UserError, match=r"0 calibration windows"):
        data.get_calibration(tok, str(path), 4, SEQLEN, cache_dir=False)
    with pytest.raises(UserError, match="0 calibration windows"):
        data.get_calibration(tok, str(write_jsonl(tmp_path / "e.jsonl", [])), 4, SEQLEN, cache_dir=False)


def test_few_long_documents_warn_but_draw(tok, tmp_path):
    docs = ["tiny.", " ".join(WORDS[:40]) + "."]  # one document, about one window long
    src = str(write_jsonl(tmp_path / "one.jsonl", docs))
    with pytest.warns(UserWarning, match="disjoint windows"):
        got = data.get_calibration(tok, src, nsamples=6, seqlen=SEQLEN, seed=0, cache_dir=False)
    assert torch.equal(got, reference_draw(tok, docs, 6, SEQLEN, 0))


def test_bad_arguments_and_sources(tok, tmp_path):
    with pytest.raises(UserError, match="nsamples"):
        data.get_calibration(tok, "c4", nsamples=0, data_dir=tmp_path, cache_dir=False)
    with pytest.raises(UserError, match="not found"):
        data.get_calibration(tok, str(tmp_path / "missing.jsonl"), 2, SEQLEN, cache_dir=False)
    # A known name whose file is absent: tries the (offline) hub, then names what it looked for.
    with pytest.raises(UserError) as ei:
        data.get_calibration(tok, "c4", 2, SEQLEN, data_dir=tmp_path, cache_dir=False)
    msg = str(ei.value)
    assert str(tmp_path / "c4" / "c4_validation_2k.parquet") in msg and "Hub" in msg and "allenai/c4" in msg
    with pytest.raises(UserError, match="no-such-dataset"):
        data.get_eval_tokens(tok, "no-such-dataset", data_dir=tmp_path, cache_dir=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="no 'text' field"):
        data.get_calibration(tok, str(bad), 2, SEQLEN, cache_dir=False)


# ----------------------------------------------------------------------------------------------
# Cache


def test_cache_hit_and_key_changes(tok, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    docs = make_docs()
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    first = data.get_calibration(tok, str(path), 6, SEQLEN, seed=0, cache_dir=cache)
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    assert not list(cache.glob("*.tmp"))

    real_load = tokens.load_corpus

    def must_not_load(src):
        raise AssertionError("cache miss: data was read again")

    monkeypatch.setattr(tokens, "load_corpus", must_not_load)
    again = data.get_calibration(tok, str(path), 6, SEQLEN, seed=0, cache_dir=cache)
    assert torch.equal(first, again)
    monkeypatch.setattr(tokens, "load_corpus", real_load)

    variants = [
        dict(nsamples=7, seqlen=SEQLEN, seed=0),
        dict(nsamples=6, seqlen=SEQLEN + 8, seed=0),
        dict(nsamples=6, seqlen=SEQLEN, seed=1),
    ]
    for i, kw in enumerate(variants, start=2):
        got = data.get_calibration(tok, str(path), cache_dir=cache, **kw)
        assert torch.equal(got, data.get_calibration(tok, str(path), cache_dir=False, **kw))
        assert len(list(cache.iterdir())) == i

    # New content under the same name (even with the same size) must not reuse the stale entry.
    new_docs = [d.replace("cat", "dog") for d in docs]
    write_jsonl(path, new_docs)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = data.get_calibration(tok, str(path), 6, SEQLEN, seed=0, cache_dir=cache)
    assert torch.equal(fresh, reference_draw(tok, new_docs, 6, SEQLEN, 0))
    assert not torch.equal(fresh, first)

    # Eval tokens are cached too, and a corrupt cache file is recomputed rather than trusted.
    ev = data.get_eval_tokens(tok, str(path), cache_dir=cache)
    eval_files = list(cache.glob("eval-*.safetensors"))
    assert len(eval_files) == 1
    eval_files[0].write_bytes(b"garbage")
    assert torch.equal(data.get_eval_tokens(tok, str(path), cache_dir=cache), ev)


def test_cache_key_depends_on_tokenizer(tok):
    ident = data.tokenizer_identity(tok)
    assert ident["vocab_size"] == len(tok) and len(ident["vocab_sha256"]) == 64
    assert data.tokenizer_identity(tok) == ident


# ----------------------------------------------------------------------------------------------
# Eval tokens


def test_eval_tokens_plain_and_docs(tok, tmp_path):
    text = "First line.\n\nSecond paragraph here.\nThird line.\n"
    plain = tmp_path / "eval.txt"
    plain.write_text(text, encoding="utf-8")
    got = data.get_eval_tokens(tok, str(plain), cache_dir=False)
    assert got.shape[0] == 1 and got.dtype == torch.long
    assert torch.equal(got, tok(text, return_tensors="pt").input_ids)

    docs = make_docs(5)
    want = tok("\n\n".join(docs), return_tensors="pt").input_ids
    for src in (
        write_jsonl(tmp_path / "e.jsonl", docs),
        write_parquet(tmp_path / "e.parquet", docs),
        write_hf_disk(tmp_path / "e_hf", docs, dict_split="test"),
    ):
        assert torch.equal(data.get_eval_tokens(tok, str(src), cache_dir=False), want), src.name


WIKI_ROWS = [
    "",
    " = Article One = \n",
    "",
    " First paragraph of the article . \n",
    " Second paragraph . \n",
    "",
    " = = Section = = \n",
    "",
    " Text of the section . \n",
]


def test_eval_tokens_wikitext_layouts(tok, tmp_path):
    want_text = "\n\n".join(WIKI_ROWS)
    want = tok(want_text, return_tensors="pt").input_ids

    # The shared copy: "".join(rows) with CRLF line ends, blank rows dropped.
    d1 = tmp_path / "d1"
    (d1 / "wikitext2").mkdir(parents=True)
    (d1 / "wikitext2" / "wiki.test.raw").write_bytes("".join(WIKI_ROWS).replace("\n", "\r\n").encode())
    assert torch.equal(data.get_eval_tokens(tok, "wikitext2", data_dir=d1, cache_dir=False), want)

    # The original zip layout: blank rows are " " lines.
    d2 = tmp_path / "d2"
    (d2 / "wikitext2").mkdir(parents=True)
    (d2 / "wikitext2" / "wiki.test.raw").write_text("".join(r or " \n" for r in WIKI_ROWS), encoding="utf-8")
    assert torch.equal(data.get_eval_tokens(tok, "wikitext2", data_dir=d2, cache_dir=False), want)
    # The same file by path is read the same way.
    got = data.get_eval_tokens(tok, str(d2 / "wikitext2" / "wiki.test.raw"), cache_dir=False)
    assert torch.equal(got, want)

    # A datasets.save_to_disk folder in place of the raw file: its test split, joined with "\n\n".
    d3 = tmp_path / "d3"
    d3.mkdir()
    write_hf_disk(d3 / "wikitext2", WIKI_ROWS, dict_split="test")
    assert torch.equal(data.get_eval_tokens(tok, "wikitext2", data_dir=d3, cache_dir=False), want)


def test_eval_tokens_ptb_and_c4(tok, tmp_path):
    (tmp_path / "ptb").mkdir()
    lines = [" no it was n't black monday ", " but while the new york stock exchange did n't fall apart "]
    (tmp_path / "ptb" / "ptb.test.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    want = tok("\n\n".join(s.strip() for s in lines), return_tensors="pt").input_ids
    assert torch.equal(data.get_eval_tokens(tok, "ptb", data_dir=tmp_path, cache_dir=False), want)

    (tmp_path / "c4").mkdir()
    docs = make_docs(4)
    write_parquet(tmp_path / "c4" / "c4_validation_2k.parquet", docs)
    want = tok(" ".join(docs), return_tensors="pt").input_ids
    assert torch.equal(data.get_eval_tokens(tok, "c4", data_dir=tmp_path, cache_dir=False), want)


def test_wikitext_rows_from_raw():
    assert data.wikitext_rows_from_raw("".join(WIKI_ROWS)) == WIKI_ROWS
    assert data.wikitext_rows_from_raw("".join(r or " \n" for r in WIKI_ROWS)) == WIKI_ROWS


# ----------------------------------------------------------------------------------------------
# Locations and run-record info


def test_source_info_and_data_dir(tmp_path, monkeypatch):
    docs = make_docs(3)
    path = write_jsonl(tmp_path / "x.jsonl", docs)
    info = data.source_info(str(path), None)
    assert info == {
        "source": str(path),
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }

    folder = write_hf_disk(tmp_path / "hf", docs)
    sha1 = data.source_info(str(folder), None)["sha256"]
    assert sha1 == data.source_info(str(folder), None)["sha256"] and len(sha1) == 64
    write_hf_disk(tmp_path / "hf2", docs[:2])
    assert data.source_info(str(tmp_path / "hf2"), None)["sha256"] != sha1

    hub = data.source_info("c4", tmp_path)  # nothing local: the hub fallback, not contacted here
    assert hub["sha256"] is None and "allenai/c4" in hub["path"]

    monkeypatch.setenv("D2PRUNE_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("D2PRUNE_DATA")
    assert isinstance(data.default_data_dir(), Path)


# ----------------------------------------------------------------------------------------------
# The real shared data


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data missing")
def test_real_shared_data(tok):
    ev = data.get_eval_tokens(tok, "wikitext2", data_dir=SHARED_DATA, cache_dir=False)
    assert ev.shape[0] == 1 and ev.shape[1] > 100_000
    cal = data.get_calibration(tok, "c4", 4, 64, seed=0, data_dir=SHARED_DATA, cache_dir=False)
    assert cal.shape == (4, 64) and cal.dtype == torch.long
    assert int(cal.max()) < len(tok)
