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

from d2prune.errors import UserError
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
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable progress record: {exc}") from None


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
        if (target / INDEX_FILE).is_file() and not work.exists():
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
