"""Choose D²Prune's un-updated projection on held-out data (``--target-layers auto``).

The paper tries "w/o q", "w/o k" and "w/o v" and keeps the one with the lowest WikiText-2 *test*
perplexity (spec §1.6). We run the same search but score each candidate on held-out windows that are
neither calibration windows nor evaluation text, and also try "none" (every linear updated).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from tqdm.auto import tqdm

from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.config import PruneConfig
from d2prune.report import PruneReport
from d2prune.errors import UserError
from d2prune.evaluation.perplexity import evaluate_ppl
from d2prune.engine.walk import prune

_QKV = re.compile(r"(^|\.)((q|k|v)_proj|query|key|value|qkv_proj|query_key_value|c_attn)$")


def target_candidates(model: torch.nn.Module) -> list[list[str]]:
    """Each query/key/value projection of a decoder layer alone, then none at all."""
    names = find_linears(find_decoder_stack(model).layers[0])
    return [[n] for n in names if _QKV.search(n)] + [[]]


def choose_target_layers(
    model: torch.nn.Module,
    calibration: Any,
    heldout: torch.LongTensor,
    config: PruneConfig,
    candidates: list[list[str]] | None = None,
) -> tuple[PruneReport, dict[str, Any]]:
    """Prune ``model`` once per candidate target list and keep the one with the lowest held-out
    perplexity; ``model`` ends pruned with the winner. Returns its report and the search record.

    ``heldout`` is a LongTensor (windows, tokens), each row one evaluation window.
    """
    if not hasattr(config.method, "target_layers"):
        raise UserError(f"--target-layers auto applies to methods with un-updated projections, not to {config.method.name}")
    candidates = candidates if candidates is not None else target_candidates(model)
    stack = find_decoder_stack(model)
    weights = {
        f"{i}.{name}": lin.weight for i, layer in enumerate(stack.layers) for name, lin in find_linears(layer).items()
    }
    dense = {k: w.detach().to("cpu", copy=True) for k, w in weights.items()}
    device = torch.device(config.device)
    scores: dict[str, float] = {}
    best: tuple[float, str, PruneReport, dict[str, torch.Tensor]] | None = None
    for cand in tqdm(candidates, desc="target-layer search", disable=not config.progress):
        label = ",".join(cand) or "none"
        with torch.no_grad():
            for k, w in weights.items():
                w.copy_(dense[k])
        method = dataclasses.replace(config.method, target_layers=list(cand))
        report = prune(model, calibration, dataclasses.replace(config, method=method))
        home = next(model.parameters()).device
        model.to(device)
        try:
            ppl = evaluate_ppl(model, heldout, heldout.shape[1], progress=False).ppl
        finally:
            model.to(home)
        scores[label] = ppl
        if best is None or ppl < best[0]:
            best = (ppl, label, report, {k: w.detach().to("cpu", copy=True) for k, w in weights.items()})
    assert best is not None
    with torch.no_grad():
        for k, w in weights.items():
            w.copy_(best[3][k])
    record = {"chosen": best[1], "heldout_ppl": scores, "heldout_windows": int(heldout.shape[0]),
              "heldout_seqlen": int(heldout.shape[1])}
    return best[2], record
