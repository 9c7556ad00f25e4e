"""Choose a method option on held-out data (e.g. D²Prune's ``--target-layers auto``).

A method config lists its candidates (``MethodConfig.heldout_candidates``); each one prunes the model,
is scored by its perplexity on held-out windows (neither calibration windows nor evaluation text),
or for an image classifier by its mean cross-entropy on held-out images (not calibration images),
and the lowest wins. For D²Prune the paper tries "w/o q", "w/o k" and "w/o v" and keeps the one with
the lowest WikiText-2 *test* perplexity (docs/methods.md#target-layers); we score on held-out data instead, and also try
"none" (every linear updated).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from tqdm.auto import tqdm

from d2prune.api import prune
from d2prune.config import PruneConfig
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.errors import UserError
from d2prune.evaluation.perplexity import evaluate_ppl
from d2prune.methods import MethodConfig
from d2prune.report import PruneReport


def heldout_candidates(model: torch.nn.Module, config: PruneConfig) -> dict[str, MethodConfig]:
    """The method configs to choose from, by label, for ``model`` (its first decoder layer's linears)."""
    names = list(find_linears(find_decoder_stack(model).layers[0]))
    return config.method.heldout_candidates(names)


def choose_on_heldout(
    model: torch.nn.Module,
    calibration: Any,
    heldout: torch.LongTensor | dict[str, torch.Tensor],
    config: PruneConfig,
    candidates: dict[str, MethodConfig] | None = None,
) -> tuple[PruneReport, dict[str, Any]]:
    """Prune ``model`` once per candidate method config and keep the one with the lowest held-out
    perplexity; ``model`` ends pruned with the winner. Returns its report and the choice's record
    (``chosen``: the winner's label, ``heldout_ppl``: the perplexity of each label).

    ``heldout`` is a LongTensor (windows, tokens), each row one evaluation window, scored as given (with
    ``--window-bos`` the windows carry BOS first already: ``d2prune.data.get_heldout(..., window_bos=...)``);
    or, for an image classifier, ``{"pixel_values", "labels"}`` (scored by the mean cross-entropy:
    ``heldout_loss``).
    """
    images = isinstance(heldout, dict)
    candidates = candidates if candidates is not None else heldout_candidates(model, config)
    if not candidates:
        raise UserError(f"{config.method.name} has no option to choose on held-out data")
    stack = find_decoder_stack(model)
    weights = {
        f"{i}.{name}": lin.weight for i, layer in enumerate(stack.layers) for name, lin in find_linears(layer).items()
    }
    dense = {k: w.detach().to("cpu", copy=True) for k, w in weights.items()}
    device = torch.device(config.device)
    scores: dict[str, float] = {}
    best: tuple[float, str, PruneReport, dict[str, torch.Tensor]] | None = None
    for label, method in tqdm(candidates.items(), desc="held-out choice", disable=not config.progress):
        with torch.no_grad():
            for k, w in weights.items():
                w.copy_(dense[k])
        report = prune(model, calibration, dataclasses.replace(config, method=method))
        home = next(model.parameters()).device
        model.to(device)
        try:
            ppl = (
                _image_loss(model, heldout, config)
                if images
                else evaluate_ppl(model, heldout, heldout.shape[1], progress=False).ppl
            )
        finally:
            model.to(home)
        scores[label] = ppl
        if best is None or ppl < best[0]:
            best = (ppl, label, report, {k: w.detach().to("cpu", copy=True) for k, w in weights.items()})
    assert best is not None
    with torch.no_grad():
        for k, w in weights.items():
            w.copy_(best[3][k])
    if images:
        return best[2], {"chosen": best[1], "heldout_loss": scores, "heldout_images": int(heldout["labels"].shape[0])}
    record = {
        "chosen": best[1],
        "heldout_ppl": scores,
        "heldout_windows": int(heldout.shape[0]),
        "heldout_seqlen": int(heldout.shape[1]),
    }
    return best[2], record


def _image_loss(model: torch.nn.Module, heldout: dict[str, torch.Tensor], config: PruneConfig) -> float:
    """Mean cross-entropy of ``model`` on held-out images, ``config.batch_size`` at a time."""
    from d2prune.evaluation.accuracy import evaluate_accuracy

    n, size = heldout["labels"].shape[0], config.batch_size
    batches = [{k: v[i : i + size] for k, v in heldout.items()} for i in range(0, n, size)]
    return evaluate_accuracy(model, batches, progress=False).loss
