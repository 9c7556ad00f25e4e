"""Perplexity on non-overlapping windows, the protocol of SparseGPT / Wanda / D²Prune (docs/evaluation.md#perplexity)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from d2prune.data.bos import WindowBos, resolve_window_bos
from d2prune.engine import distributed
from d2prune.engine.precision import as_dtype, computing_in
from d2prune.errors import UserError


@dataclass
class PerplexityResult:
    """Perplexity and what it was computed on. ``nll_per_window`` is mean CE × seqlen per window."""

    ppl: float
    n_windows: int
    n_tokens: int
    seqlen: int
    nll_per_window: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-free module (tests, wrappers) runs on the CPU
        return torch.device("cpu")


def evaluate_ppl(
    model: torch.nn.Module,
    tokens: torch.LongTensor,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    window_bos: str | WindowBos = "never",
) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` cut into ⌊n/seqlen⌋ windows (tail dropped).

    Per window: mean cross-entropy of next-token prediction over its seqlen−1 positions, × seqlen;
    ppl = exp(Σ / (n_windows · seqlen)). The loss is taken in float32 whatever the model's dtype.
    Each window is scored on its own (no context carried over), so ``batch_size`` does not change
    the result beyond float rounding. ``device`` None means the device of the model's first parameter.
    ``compute_dtype``: the dtype the forwards run in (``engine.precision``; None: the model's); the
    model's weights are as they were afterwards. ``window_bos``: "never" (default: the windows as cut),
    "always" (BOS replaces each window's first token, which is never a target, so the same tokens are
    scored), "auto" (by the model's model_type), or a :class:`~d2prune.data.WindowBos` resolved with the
    tokenizer; a string takes the BOS id from the model config (see docs/data.md#window-bos).
    """
    windows = eval_windows(tokens, seqlen, batch_size, max_windows, resolve_window_bos(window_bos, model))
    n_windows = windows.shape[0]
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()  # dropout (OPT) must be off, as in the reference evaluation
    # [distributed] under torchrun each rank scores a contiguous share of the batches and the
    # per-window NLLs are summed over ranks (each rank fills only its own slots: the sum is exact)
    world = distributed.current()
    lo, hi = world.bounds(len(range(0, n_windows, batch_size)))
    starts = range(lo * batch_size, min(hi * batch_size, n_windows), batch_size)
    nll = torch.zeros(n_windows, dtype=torch.float64)
    try:
        with (
            torch.inference_mode(),
            computing_in(model, as_dtype(compute_dtype, dev)),
            world.sync("computing perplexity"),
            tqdm(
                total=sum(min(batch_size, n_windows - s) for s in starts),
                desc="perplexity",
                unit="win",
                disable=not progress,
            ) as bar,
        ):
            for start in starts:
                batch = windows[start : start + batch_size].to(dev)
                # Only this batch's logits are alive at a time: they are the big tensor here.
                values = window_nlls(model(input_ids=batch, use_cache=False).logits, batch)
                nll[start : start + batch.shape[0]] = torch.tensor(values, dtype=torch.float64)
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    world.all_reduce_sum([nll], "summing the perplexity")
    return perplexity_result(nll.tolist(), seqlen)


def eval_windows(
    tokens: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    window_bos: WindowBos | None = None,
) -> torch.LongTensor:
    """``tokens`` cut into ⌊n/seqlen⌋ windows (windows, seqlen), tail dropped, at most ``max_windows``;
    with BOS as each window's first token if ``window_bos`` says so."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise UserError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise UserError(f"max_windows must be a positive integer or None, got {max_windows!r}")
    flat = tokens.reshape(-1)
    n_windows = flat.numel() // seqlen
    if n_windows == 0:
        raise UserError(f"evaluation data has {flat.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = flat[: n_windows * seqlen].view(n_windows, seqlen).long()
    return window_bos.apply(windows) if window_bos is not None else windows


def window_nlls(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    """Per window of ``batch``: mean next-token cross-entropy (float32) × seqlen."""
    seqlen = batch.shape[1]
    shift_logits = logits[:, :-1, :].float()
    del logits
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        batch[:, 1:].reshape(-1),
        reduction="none",
    ).view(batch.shape[0], seqlen - 1)
    del shift_logits
    # Summed in float64 on the host so the total does not depend on the batching.
    return (loss.double().mean(dim=1) * seqlen).tolist()


def perplexity_result(nlls: list[float], seqlen: int) -> PerplexityResult:
    """ppl = exp(Σ nll / (windows · seqlen)) from the per-window values of ``window_nlls``."""
    n_windows = len(nlls)
    ppl = math.exp(math.fsum(nlls) / (n_windows * seqlen))
    return PerplexityResult(
        ppl=ppl, n_windows=n_windows, n_tokens=n_windows * seqlen, seqlen=seqlen, nll_per_window=nlls
    )
