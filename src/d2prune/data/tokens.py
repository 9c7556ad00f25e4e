"""The token tensors d2prune consumes: calibration windows, held-out windows, evaluation tokens and
fine-tuning blocks, each through the token cache.

The draw of calibration windows reproduces the SparseGPT / Wanda / D²Prune C4 loader bit for bit
(same random sequence, same acceptance rule), so that a seed means the same windows as in the
reference code when the documents and the tokenizer are the same.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch

from d2prune.data.bos import WindowBos, resolve_window_bos
from d2prune.data.cache import cached
from d2prune.data.readers import calibration_docs, eval_text, load_corpus
from d2prune.data.sources import resolve_source
from d2prune.errors import UserError


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
    window_bos: str | WindowBos = "never",
) -> torch.LongTensor:
    """``nsamples`` calibration windows of ``seqlen`` tokens, shape (nsamples, seqlen), drawn as the
    SparseGPT/Wanda C4 loader draws them (see module docstring).

    Document sources (C4, json, parquet, datasets folders) draw from their documents; text sources
    (plain files, wikitext2, ptb) draw from blank-line separated paragraphs, or from the whole text as
    one document when no paragraph is longer than ``seqlen``. ``cache_dir=False`` disables the cache.
    ``window_bos``: "never" (default, the reference windows), "always" (BOS replaces the first token of
    every window, :mod:`d2prune.data.bos`) or a :class:`WindowBos` resolved for the model.
    """
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}")
    bos = resolve_window_bos(window_bos, tokenizer=tokenizer)
    src = resolve_source(source, data_dir, "calibration")

    def draw() -> torch.Tensor:
        docs, whole = calibration_docs(load_corpus(src))
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

    key = {"kind": "calibration", "nsamples": nsamples, "seqlen": seqlen, "seed": seed, **bos.cache_key()}
    return cached(cache_dir, "calib", src, tokenizer, key, lambda: bos.apply(draw()))


def get_heldout(
    tokenizer,
    source: str = "c4",
    nsamples: int = 16,
    seqlen: int = 2048,
    calib_nsamples: int = 128,
    calib_seed: int = 0,
    seed: int = 1,
    data_dir: Path | None = None,
    window_bos: str | WindowBos = "never",
) -> torch.LongTensor:
    """``nsamples`` windows of ``seqlen`` tokens from documents of ``source`` that the calibration
    draw (``calib_nsamples``, ``seqlen``, ``calib_seed``) did not touch: held-out text for choosing
    hyper-parameters without looking at the calibration windows or the evaluation text.
    ``window_bos`` as for :func:`get_calibration` (BOS does not change which documents are drawn)."""
    _check_positive(nsamples=nsamples, seqlen=seqlen, calib_nsamples=calib_nsamples)
    bos = resolve_window_bos(window_bos, tokenizer=tokenizer)
    src = resolve_source(source, data_dir, "calibration")
    docs, _ = calibration_docs(load_corpus(src))
    try:
        _, used = _draw(tokenizer, docs, calib_nsamples, seqlen, calib_seed, src.name)
        windows, _ = _draw(tokenizer, docs, nsamples, seqlen, seed, src.name, exclude=frozenset(used))
    except _NoWindows:
        raise UserError(
            f"data source {src.name!r} ({src.location}) has no document of more than {seqlen} tokens "
            f"left after the {calib_nsamples} calibration windows; held-out windows need separate documents"
        ) from None
    return bos.apply(windows)


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
    The windows are cut later (``evaluation.perplexity.eval_windows``), and BOS set there
    (``window_bos``): the cached tokens are the same whatever ``--window-bos``.
    """
    src = resolve_source(source, data_dir, "eval")

    def tokenize() -> torch.Tensor:
        text = eval_text(load_corpus(src))
        if not text.strip():
            raise UserError(f"data source {src.name!r} ({src.location}) holds no text to evaluate on")
        return tokenizer(text, return_tensors="pt", verbose=False).input_ids.long()

    return cached(cache_dir, "eval", src, tokenizer, {"kind": "eval"}, tokenize)


# --------------------------------------------------------------------------------------------------
# Fine-tuning text


def get_train_blocks(
    tokenizer,
    source: str = "c4",
    block_size: int = 1024,
    max_samples: int | None = None,
    data_dir: Path | None = None,
    cache_dir: Path | None | bool = None,
    window_bos: str | WindowBos = "never",
) -> torch.LongTensor:
    """Training blocks for LoRA fine-tuning, shape (n_blocks, block_size), as HF ``run_clm`` makes them.

    Every document of ``source`` (its training-like split, as for calibration) is tokenized with the
    tokenizer's own special tokens, the ids are concatenated in document order and cut into
    ``block_size`` chunks (tail dropped); the first ``max_samples`` chunks are kept (all if None).
    ``window_bos`` as for :func:`get_calibration`: "always" makes BOS the first token of every block.
    """
    _check_positive(block_size=block_size)
    if max_samples is not None:
        _check_positive(max_samples=max_samples)
    bos = resolve_window_bos(window_bos, tokenizer=tokenizer)
    src = resolve_source(source, data_dir, "calibration")

    def blocks() -> torch.Tensor:
        docs, _ = calibration_docs(load_corpus(src))
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
        return bos.apply(torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size))

    key = {"kind": "train-blocks", "block_size": block_size, "max_samples": max_samples, **bos.cache_key()}
    return cached(cache_dir, "train", src, tokenizer, key, blocks)
