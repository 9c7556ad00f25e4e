"""Resuming an interrupted streamed prune: the work folder, the progress record, RNG state and the
calibration fingerprint.

Testing aid: with the environment variable ``D2PRUNE_KILL_AFTER_LAYER=k`` the process kills itself
(SIGKILL) right after layer k's progress is recorded, to test resuming after a crash."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from d2prune.engine.activations import Activations
from d2prune.errors import UserError
from d2prune.io.sparse import SPARSE_INDEX
from d2prune.report import PruneReport
from d2prune.streaming.checkpoint import INDEX_FILE

PROGRESS_FILE = "progress.json"


PROGRESS_FORMAT = 1


KILL_ENV = "D2PRUNE_KILL_AFTER_LAYER"


RESUME_UNDER_TORCHRUN = (
    "--resume cannot run under torchrun: resume the interrupted run in one process (without torchrun)"
)


def work_dir(target: str | Path) -> Path:
    """The folder an unfinished streamed run writes into (renamed to ``target`` when complete)."""
    target = Path(os.path.abspath(Path(target).expanduser()))
    return target.parent / f".{target.name}.partial"


def read_progress(target: str | Path) -> dict | None:
    """The progress record of an interrupted streamed run into ``target``, or None."""
    path = work_dir(target) / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable progress record: {exc}") from None
    # What the checks and the resume read first; a record without them is damaged, not a bug.
    needed = ("format", "fingerprint", "next_layer", "num_layers", "weight_map", "report", "activations", "rng")
    if not isinstance(progress, dict) or not all(k in progress for k in needed):
        raise UserError(f"{path} is not a readable progress record: it lacks {', '.join(needed)}; delete {path.parent}")
    return progress


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


# The report's fields that the layers pruned before an interruption filled in; the rest (config,
# nsamples, ...) the continued run sets itself.
_RESUMED_REPORT_FIELDS = ("linears", "zeros", "weights", "layer_sparsities", "outlier_ratios", "timings")


def progress_record(
    fingerprint: dict,
    next_layer: int,
    num_layers: int,
    weight_map: dict[str, str],
    activations: Activations,
    report: PruneReport,
    ranks: int,
) -> dict[str, Any]:
    """What ``progress.json`` holds after a layer: enough to continue the run from ``next_layer``."""
    saved = activations.describe()
    saved["current"] = activations.current
    return {
        "format": PROGRESS_FORMAT,
        "fingerprint": fingerprint,
        "next_layer": next_layer,
        "num_layers": num_layers,
        "weight_map": weight_map,
        "activations": saved,
        "rng": _rng_state(),
        "torch_threads": torch.get_num_threads(),
        "ranks": ranks,
        "report": {
            k: v
            for k, v in {**report.to_dict(), "zeros": report.zeros, "weights": report.weights}.items()
            if k in _RESUMED_REPORT_FIELDS
        },
    }


def check_resumable(progress: dict, fingerprint: dict, work: Path, ranks: int) -> None:
    """Refuse a progress record of another d2prune version or of another run (model, data, config);
    warn where the continued run may differ from an uninterrupted one in the last bits."""
    if progress.get("format") != PROGRESS_FORMAT:
        raise UserError(f"{work / PROGRESS_FILE} was written by another d2prune version; delete {work}")
    old = progress["fingerprint"]
    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if changed:
        raise UserError(
            f"cannot resume {work}: {', '.join(changed)} differ from the interrupted run "
            f"(repeat its command; or delete {work} to start over)"
        )
    threads = progress.get("torch_threads")
    if threads != torch.get_num_threads():
        # Float sums are split differently across threads: still a valid result, not a bit-identical one.
        print(
            f"d2prune: warning: the interrupted run used {threads} torch threads, this one "
            f"{torch.get_num_threads()}; the result may differ from an uninterrupted run in the last bits",
            file=sys.stderr,
        )
    saved_ranks = progress.get("ranks", 1)
    if saved_ranks != ranks:
        # Its ranks summed the statistics in another order; its activation files were per rank,
        # so the pruned layers are re-run here.
        print(
            f"d2prune: warning: the interrupted run ran on {saved_ranks} ranks (torchrun), this one on "
            f"{ranks}; the result may differ from an uninterrupted run in the last bits",
            file=sys.stderr,
        )


def restore_report(report: PruneReport, progress: dict) -> int:
    """Put the interrupted run's entries into ``report``; returns the first layer still to prune."""
    saved = PruneReport.from_dict({**progress["report"], "config": report.config})
    for name in _RESUMED_REPORT_FIELDS:
        setattr(report, name, getattr(saved, name))
    report.timings = dict(report.timings)  # the run adds to it: not the progress record's own dict
    report.resumed_at_layer = progress["next_layer"]
    report.activations = progress["activations"]
    return progress["next_layer"]


def calibration_sha256(batches: list[dict[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key]
            if isinstance(t, torch.Tensor):
                digest.update(key.encode())
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _prepare_work_dir(target: Path, resume: bool) -> dict | None:
    """Check the work folder of ``target`` against ``resume`` and clear what is not kept; returns the
    progress record to resume from (None: start from the first layer)."""
    work = work_dir(target)
    progress = read_progress(target)
    if resume and progress is None:
        if ((target / INDEX_FILE).is_file() or (target / SPARSE_INDEX).is_file()) and not work.exists():
            raise UserError(f"nothing to resume: {target} is already complete")
        # Stopped before its first layer was done (or never started): nothing to keep.
        print(f"d2prune: no progress recorded in {work}; starting from the first layer", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    if not resume and work.exists():
        if progress is not None:
            raise UserError(
                f"{work} holds an interrupted run ({progress['next_layer']} of {progress['num_layers']} layers done): "
                f"continue it with --resume, or delete that folder to start over"
            )
        shutil.rmtree(work)
    return progress
