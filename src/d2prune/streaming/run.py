"""Pruning a checkpoint streamed from disk: ``prune_checkpoint``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from d2prune.api import prune
from d2prune.config import PruneConfig
from d2prune.engine import distributed
from d2prune.engine.capture import calibration_batches
from d2prune.errors import UserError
from d2prune.io.models import check_save_format
from d2prune.report import PruneReport
from d2prune.streaming.model import StreamedModel
from d2prune.streaming.resume import (
    RESUME_UNDER_TORCHRUN,
    _prepare_work_dir,
    calibration_sha256,
)
from d2prune.streaming.store import StreamedStore


def prune_checkpoint(
    folder: str | Path,
    calibration: Any,
    config: PruneConfig,
    target: str | Path,
    *,
    dtype: str = "float32",
    resume: bool = False,
    streamed: StreamedModel | None = None,
    save_format: str = "dense",
) -> tuple[PruneReport, Path]:
    """Prune the model in ``folder`` (safetensors) layer by layer without ever holding more than one
    decoder layer of it, writing the pruned model to ``target``. Returns the report and ``target``.


    ``resume``: continue an interrupted run into ``target`` (same model, data and config).
    ``streamed``: a ``StreamedModel`` of ``folder`` built by the caller (tests watch it).
    ``save_format``: ``"sparse"`` converts the finished output to a sparse folder (``d2prune.io.sparse``),
    shard by shard, before it is put in place.


    Under torchrun (see ``d2prune.engine.distributed``) every rank reads ``folder``, and rank 0 writes
    ``target``; ``resume`` is refused there (a run that torchrun started can be resumed by one process).
    """
    obstacle = config.method.streaming_obstacle()
    if obstacle:
        raise UserError(f"{obstacle}; it cannot stream from disk (--offload none)")
    check_save_format(save_format)
    world = distributed.current()
    if resume and world.size > 1:
        raise UserError(RESUME_UNDER_TORCHRUN)
    with world.sync("reading the model's checkpoint"):
        streamed = streamed or StreamedModel(folder, dtype)
    target = Path(os.path.abspath(Path(target).expanduser()))
    progress = None
    # [distributed] rank 0 alone looks at and clears the work folder; the others wait for it
    with world.sync("preparing the output folder"):
        if world.rank == 0:
            progress = _prepare_work_dir(target, resume)
    config_dict = {k: v for k, v in config.to_dict().items() if k not in ("activation_offload", "offload_threshold")}
    fingerprint = {
        "model": str(streamed.folder.resolve()),
        "checkpoint_files": streamed.checkpoint.files_fingerprint(),
        "dtype": str(streamed.dtype),
        "config": json.loads(json.dumps(config_dict, default=str)),
        "calibration_sha256": calibration_sha256(calibration_batches(calibration, config.batch_size)),
    }
    store = StreamedStore(streamed, target, fingerprint, resume and progress is not None)
    report = prune(streamed.model, calibration, config, store=store)
    t0 = time.perf_counter()
    world.barrier("closing the activation files")  # [distributed] before rank 0 renames the folder
    with world.sync("writing the pruned model"):
        if world.rank == 0:
            store.finish(report.sparsity_record(), save_format)
    report.timings["write_rest"] = time.perf_counter() - t0
    return report, target
