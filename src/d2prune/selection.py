"""Choose a method option on held-out data (e.g. D²Prune's ``--target-layers auto``).

A method config lists its candidates (``MethodConfig.heldout_candidates``); each one prunes the model,
is scored by its perplexity on held-out windows (neither calibration windows nor evaluation text),
or for an image classifier by its mean cross-entropy on held-out images (not calibration images),
and the lowest wins. For D²Prune the paper tries "w/o q", "w/o k" and "w/o v" and keeps the one with
the lowest WikiText-2 *test* perplexity (docs/methods.md#target-layers); we score on held-out data instead, and also try
"none" (every linear updated).

With ``progress_dir`` the search can be resumed candidate by candidate: after each candidate the
scores so far, the best one's report and its pruned weights (``best-*.safetensors``) are written there
(rank 0 only), and a rerun with the same ``identity``, candidates and held-out data skips the
candidates already scored. At the full protocol one candidate is a whole prune of ~30 min here.
``progress.json`` alone (the weights file lost, e.g. a search moved to another machine) still resumes:
if the winner is a candidate it scored, that candidate is pruned again. Pruning is deterministic, but
float arithmetic may round differently on another machine: weights that differ from the digest the
record keeps are scored again, and the choice stands only if they still beat every other candidate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from d2prune.api import prune
from d2prune.config import PruneConfig
from d2prune.engine import distributed
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
    progress_dir: Path | None = None,
    identity: str = "",
) -> tuple[PruneReport, dict[str, Any]]:
    """Prune ``model`` once per candidate method config and keep the one with the lowest held-out
    perplexity; ``model`` ends pruned with the winner. Returns its report and the choice's record
    (``chosen``: the winner's label, ``heldout_ppl``: the perplexity of each label).

    ``heldout`` is a LongTensor (windows, tokens), each row one evaluation window, scored as given (with
    ``--window-bos`` the windows carry BOS first already: ``d2prune.data.get_heldout(..., window_bos=...)``);
    or, for an image classifier, ``{"pixel_values", "labels"}`` (scored by the mean cross-entropy:
    ``heldout_loss``). ``progress_dir`` and ``identity`` (what else the run depends on, e.g. its
    command): resume an interrupted search (module docstring).
    """
    candidates = candidates if candidates is not None else heldout_candidates(model, config)
    if not candidates:
        raise UserError(f"{config.method.name} has no option to choose on held-out data")
    stack = find_decoder_stack(model)
    weights = {
        f"{i}.{name}": lin.weight for i, layer in enumerate(stack.layers) for name, lin in find_linears(layer).items()
    }
    dense = {k: w.detach().to("cpu", copy=True) for k, w in weights.items()}
    key = _fingerprint(identity, list(candidates), heldout)
    scores, best = _read_progress(progress_dir, key) if progress_dir is not None else ({}, None)
    resumed = list(scores)
    for label, method in tqdm(candidates.items(), desc="held-out choice", disable=not config.progress):
        if label in scores:
            continue  # scored by an interrupted run of the same search
        report = _prune_from(model, weights, dense, calibration, dataclasses.replace(config, method=method))
        scores[label] = ppl = _score(model, heldout, config)
        improved = best is None or ppl < best[0]
        if improved:
            kept = {k: w.detach().to("cpu", copy=True) for k, w in weights.items()}
            best = (ppl, label, report, kept, weights_sha256(kept))
        if progress_dir is not None and distributed.current().rank == 0:
            _write_progress(progress_dir, key, scores, best, improved)
    assert best is not None
    repruned: dict[str, Any] = {}
    if best[3] is None:  # the winner's weights were not kept: prune it again
        label = best[1]
        report = _prune_from(model, weights, dense, calibration, dataclasses.replace(config, method=candidates[label]))
        kept = {k: w.detach().to("cpu", copy=True) for k, w in weights.items()}
        repruned = {"label": label, "identical_weights": weights_sha256(kept) == best[4]}
        if not repruned["identical_weights"]:
            # Another machine can round differently: score these weights, and keep
            # the choice only if they still beat every other candidate.
            repruned["heldout_score_before"] = best[0]
            scores[label] = _score(model, heldout, config)
            beaten = {k: v for k, v in scores.items() if k != label and v <= scores[label]}
            if beaten:
                raise UserError(
                    f"held-out search: candidate {label!r} pruned again scores {scores[label]:.6g} on held-out "
                    f"data, no longer below {beaten} (it scored {best[0]:.6g} when the search ran); "
                    f"delete {progress_dir} to search afresh"
                )
        best = (scores[label], label, report, kept, weights_sha256(kept))
        if progress_dir is not None and distributed.current().rank == 0:
            _write_progress(progress_dir, key, scores, best, True)
    with torch.no_grad():
        for k, w in weights.items():
            w.copy_(best[3][k])
    if isinstance(heldout, dict):
        record = {"chosen": best[1], "heldout_loss": scores, "heldout_images": int(heldout["labels"].shape[0])}
    else:
        record = {
            "chosen": best[1],
            "heldout_ppl": scores,
            "heldout_windows": int(heldout.shape[0]),
            "heldout_seqlen": int(heldout.shape[1]),
        }
    if resumed:
        record["scored_by_an_interrupted_run"] = resumed
    if repruned:
        record["pruned_again_after_resume"] = repruned
    return best[2], record


def _score(model: torch.nn.Module, heldout: Any, config: PruneConfig) -> float:
    """The held-out perplexity of ``model`` (mean cross-entropy for images), on ``config.device``."""
    home = next(model.parameters()).device
    model.to(torch.device(config.device))
    try:
        if isinstance(heldout, dict):
            return _image_loss(model, heldout, config)
        return evaluate_ppl(model, heldout, heldout.shape[1], progress=False).ppl
    finally:
        model.to(home)


def _prune_from(
    model: torch.nn.Module, weights: dict, dense: dict, calibration: Any, config: PruneConfig
) -> PruneReport:
    """Put the dense weights back and prune ``model`` with ``config``."""
    with torch.no_grad():
        for k, w in weights.items():
            w.copy_(dense[k])
    return prune(model, calibration, config)


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors' names, dtypes, shapes and bytes, in the dict's order."""
    h = hashlib.sha256()
    for k, w in weights.items():
        h.update(json.dumps([k, str(w.dtype), list(w.shape)]).encode())
        h.update(w.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _image_loss(model: torch.nn.Module, heldout: dict[str, torch.Tensor], config: PruneConfig) -> float:
    """Mean cross-entropy of ``model`` on held-out images, ``config.batch_size`` at a time."""
    from d2prune.evaluation.accuracy import evaluate_accuracy

    n, size = heldout["labels"].shape[0], config.batch_size
    batches = [{k: v[i : i + size] for k, v in heldout.items()} for i in range(0, n, size)]
    return evaluate_accuracy(model, batches, progress=False).loss


PROGRESS = "progress.json"


def _fingerprint(identity: str, labels: list[str], heldout: torch.Tensor | dict[str, torch.Tensor]) -> str:
    """What a resumed search must share with the interrupted one: the caller's identity, the
    candidates in order and the held-out data's bytes."""
    from d2prune.streaming.resume import calibration_sha256  # the same digest of tensor batches

    data = calibration_sha256([heldout if isinstance(heldout, dict) else {"input_ids": heldout}])
    return hashlib.sha256(json.dumps([identity, labels, data]).encode()).hexdigest()


def _read_progress(folder: Path, key: str) -> tuple[dict[str, float], tuple | None]:
    """The scores and best candidate an interrupted search with the same fingerprint left in ``folder``:
    (ppl, label, report, weights or None when its weights file is gone, the weights' digest)."""
    from safetensors.torch import load_file

    try:
        saved = json.loads((folder / PROGRESS).read_text(encoding="utf-8"))
        if saved.get("key") != key:
            return {}, None  # another search's progress: start afresh (it is overwritten)
        label, digest = saved["best"], saved["weights_sha256"]
        path = folder / saved["weights_file"]
        weights = load_file(path) if path.is_file() else None
        report = PruneReport.from_dict(saved["report"])
        return dict(saved["scores"]), (saved["scores"][label], label, report, weights, digest)
    except (OSError, ValueError, KeyError, TypeError):
        return {}, None


def _write_progress(folder: Path, key: str, scores: dict[str, float], best: tuple, improved: bool) -> None:
    """The best's weights (when it changed), then the scores and its report; a crash at any point
    leaves a readable state."""
    from safetensors.torch import save_file

    from d2prune.io.atomic import atomic_path, write_json_atomic

    _, label, report, weights, digest = best
    # One weights file per best so far, written before the record that names it; older ones go after.
    name = f"best-{hashlib.sha256(label.encode()).hexdigest()[:12]}.safetensors"
    if improved:
        with atomic_path(folder / name) as tmp:
            save_file({k: w.contiguous() for k, w in weights.items()}, str(tmp))
    report_dict = {**report.to_dict(), "zeros": report.zeros, "weights": report.weights}
    record = {"key": key, "scores": scores, "best": label, "weights_file": name, "weights_sha256": digest}
    record["report"] = report_dict
    write_json_atomic(folder / PROGRESS, record)
    for old in folder.glob("best-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
