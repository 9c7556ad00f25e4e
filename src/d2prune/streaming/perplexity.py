"""Perplexity of a saved model streamed from disk, one decoder layer in memory at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from d2prune.data.bos import WindowBos, resolve_window_bos
from d2prune.engine import distributed
from d2prune.engine.activations import Activations
from d2prune.engine.capture import calibration_batches, capture_inputs_and_arguments
from d2prune.engine.standin import standing_in
from d2prune.engine.walk import forward_layers
from d2prune.streaming.model import StreamedModel, StreamingLayers


@torch.no_grad()
def evaluate_streamed(
    folder: str | Path,
    tokens: torch.Tensor,
    seqlen: int,
    *,
    dtype: str = "float32",
    batch_size: int = 1,
    max_windows: int | None = None,
    device: str = "cpu",
    activation_offload: str = "auto",
    threshold: float = 0.5,
    progress: bool = True,
    window_bos: str | WindowBos = "never",
):
    """Perplexity of the model in ``folder`` computed layer by layer (the same windows and loss as
    ``evaluation.perplexity.evaluate_ppl``): one decoder layer in memory at a time, then the final norm and head
    applied to the last layer's outputs. Under torchrun each rank runs its share of the windows (every
    rank reads ``folder``) and the per-window NLLs are summed over ranks. ``window_bos`` as for
    ``evaluate_ppl`` (a string resolves against the folder's config)."""
    from d2prune.evaluation.perplexity import eval_windows, perplexity_result

    world = distributed.current()
    streamed = StreamedModel(folder, dtype)
    dev = torch.device(device)
    bos = resolve_window_bos(window_bos, streamed.model)
    windows = eval_windows(tokens, seqlen, batch_size, max_windows, bos)
    batches = calibration_batches(windows, batch_size)
    # [distributed] this rank's batches (maybe none); each rank fills only its own windows' slots
    local, lo = world.shard(batches, "evaluation batches", allow_empty=True)
    first = sum(b["input_ids"].shape[0] for b in batches[:lo])
    nll = torch.zeros(windows.shape[0], dtype=torch.float64)
    with world.sync("computing perplexity layer by layer"):
        if local:
            values = _streamed_nlls(streamed, local, dev, activation_offload, threshold, progress)
            nll[first : first + len(values)] = torch.tensor(values, dtype=torch.float64)
    world.all_reduce_sum([nll], "summing the perplexity")
    return perplexity_result(nll.tolist(), seqlen)


def _streamed_nlls(
    streamed: StreamedModel,
    batches: list[dict],
    dev: torch.device,
    activation_offload: str,
    threshold: float,
    progress: bool,
) -> list[float]:
    """Per window of ``batches``: the NLL of ``evaluation.perplexity.window_nlls``, one decoder layer at a time."""
    from d2prune.evaluation.perplexity import window_nlls

    model, stack = streamed.model, streamed.stack
    sizes = [b["input_ids"].shape[0] for b in batches]
    store = StreamingLayers(streamed)
    acts = Activations(activation_offload, dev, None, threshold)
    try:
        with store.outside_stack(dev):
            _, extras = capture_inputs_and_arguments(model, stack, batches, dev, acts)
        forward_layers(
            stack,
            store,
            acts,
            extras,
            sizes,
            range(len(stack.layers)),
            dev,
            pruned=False,
            progress=progress,
            desc="perplexity (layers)",
        )
        nlls: list[float] = []
        head = streamed.outside_names(head=True)
        # The first stand-in returns the last layer's outputs, the others hand them on.
        with standing_in(stack, range(len(stack.layers))) as standins, streamed.loaded(head, dev):
            start = 0
            for batch, size in tqdm(list(zip(batches, sizes)), desc="perplexity (head)", disable=not progress):
                standins[0].inject = acts.inps[start : start + size].to(dev)
                ids = batch["input_ids"].to(dev)
                nlls.extend(window_nlls(model(input_ids=ids, use_cache=False).logits, ids))
                start += size
    finally:
        acts.close()
    return nlls
