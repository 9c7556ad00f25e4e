"""The layer store of a streamed prune: each pruned layer written to its own output shard, progress recorded
after every layer, and the finished output folder put in place."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
import torch.nn as nn

from d2prune.config import PruneConfig
from d2prune.engine import distributed
from d2prune.engine.activations import PATTERN as ACTIVATION_FILES
from d2prune.engine.activations import Activations
from d2prune.io.atomic import atomic_path, publish_folder, write_json_atomic, write_synced
from d2prune.report import PruneReport
from d2prune.streaming.checkpoint import INDEX_FILE, Checkpoint, _torch_dtype
from d2prune.streaming.model import StreamedModel, StreamingLayers
from d2prune.streaming.resume import (
    KILL_ENV,
    PROGRESS_FILE,
    _set_rng_state,
    check_resumable,
    progress_record,
    read_progress,
    restore_report,
    work_dir,
)

# Files of a model folder that are weights or that we write ourselves; every other top-level file
# (tokenizer, generation config, chat template, licence) is copied to the output as is.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


_NOT_COPIED = {INDEX_FILE, "pytorch_model.bin.index.json", "config.json", "sparsity.json", PROGRESS_FILE}


def _shard_plan(streamed: StreamedModel) -> tuple[list[list[str]], list[list[str]]]:
    """Output shards: the tensors outside the stack packed into shards no bigger than the biggest
    layer (a bigger single tensor gets its own), then one shard per decoder layer. Writing a shard
    therefore never holds more than one layer's worth, or one tensor, in memory."""
    layers = [streamed.names_under(streamed.layer_prefix(i)) for i in range(len(streamed.stack.layers))]
    budget = max(sum(streamed.stored_bytes(n) for n in names) for names in layers)
    rest: list[list[str]] = []
    size = 0
    for name in streamed.outside_names(head=True):
        nbytes = streamed.stored_bytes(name)
        if not rest or size + nbytes > budget:
            rest.append([])
            size = 0
        rest[-1].append(name)
        size += nbytes
    return rest, layers


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors shard via a temporary name, synced: a listed shard is a complete one."""
    from safetensors.torch import save_file

    # 0o644: safetensors creates the file owner-only; save_pretrained's files are world-readable.
    with atomic_path(path, mode=0o644) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


class StreamedStore(StreamingLayers):
    """Streams the layers and writes each pruned one to its output shard; records progress after
    every layer and resumes from it.


    Under torchrun every rank streams the layers (the checkpoint must be readable on every machine)
    and keeps its own activation files in the work folder; rank 0 alone writes the shards, the
    progress record and the rest of the output (``finish``).
    """

    def __init__(self, streamed: StreamedModel, target: Path, fingerprint: dict, resume: bool):
        super().__init__(streamed)
        self.world = distributed.current()
        self.target = target
        self.work = work_dir(target)
        self.fingerprint = fingerprint
        self.progress = read_progress(target) if resume else None
        self.rest, self.layers = _shard_plan(streamed)
        total = len(self.rest) + len(self.layers)
        self.files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.weight_map: dict[str, str] = {}
        self._rng: dict | None = None
        self.work.mkdir(parents=True, exist_ok=True)

    def _layer_file(self, index: int) -> str:
        return self.files[len(self.rest) + index]

    def restore(self, report: PruneReport) -> int:
        if self.progress is None:
            return 0
        check_resumable(self.progress, self.fingerprint, self.work, self.world.size)
        self.weight_map = dict(self.progress["weight_map"])
        self._rng = self.progress["rng"]
        return restore_report(report, self.progress)

    def activations(self, config: PruneConfig, device: torch.device) -> Activations:
        acts = Activations(
            config.activation_offload, device, self.work, config.offload_threshold, rank=self.world.file_rank
        )
        saved = (self.progress or {}).get("activations") or {}
        if saved.get("storage") == "disk" and config.activation_offload != "ram":
            acts.reopen(tuple(saved["shape"]), _torch_dtype(saved["dtype"]), saved["current"])
        return acts

    def fetch(self, index: int, layer: nn.Module, device: torch.device, pruned: bool = False) -> None:
        names = self.layers[index]
        if pruned:  # re-run on resume: the layer as written after pruning
            out = [self.streamed.out_name[n] for n in names]
            self.streamed.load(names, device, Checkpoint(self.work, {n: self.weight_map[n] for n in out}))
            return
        if self._rng is not None:  # the first layer pruned after a resume starts where the run stopped
            _set_rng_state(self._rng)
            self._rng = None
        self.streamed.load(names, device)

    def release(self, index: int, layer: nn.Module, save: bool) -> None:
        names = self.layers[index]
        if save:
            file = self._layer_file(index)
            if self.world.rank == 0:  # every rank holds the same pruned layer: rank 0 writes it
                _save_shard({self.streamed.out_name[n]: self.streamed.tensor(n) for n in names}, self.work / file)
            self.weight_map.update({self.streamed.out_name[n]: file for n in names})
        self.streamed.release(names)

    def layer_done(self, index: int, report: PruneReport, activations: Activations) -> None:
        activations.flush()
        if self.world.rank > 0:  # rank 0 records the progress (its own activation files)
            self._kill_if_asked(index)
            return
        write_json_atomic(
            self.work / PROGRESS_FILE,
            progress_record(
                self.fingerprint, index + 1, len(self.layers), self.weight_map, activations, report, self.world.size
            ),
        )
        self._kill_if_asked(index)

    @staticmethod
    def _kill_if_asked(index: int) -> None:
        if os.environ.get(KILL_ENV, "") == str(index):
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self, activations: Activations, completed: bool) -> None:
        # An interrupted run keeps its activation files: a resume starts from them.
        activations.close(delete=completed)
        if self.world.rank > 0:
            try:  # a rank on another machine leaves no empty work folder behind (rank 0 fills its own)
                self.work.rmdir()
            except OSError:
                pass

    def finish(self, sparsity_record: dict, save_format: str = "dense") -> Path:
        """Write the tensors outside the stack, the index, config, tokenizer files and the sparsity
        record, then rename the folder into place (rank 0 only, once every rank has closed its
        activation files). ``save_format="sparse"`` converts the weights in the work folder first,
        after the progress record is gone: an interrupted conversion leaves no resumable or
        complete-looking folder, only the work folder a new run clears."""
        from d2prune.io.folders import record_text
        from d2prune.io.models import SPARSITY_FILE
        from d2prune.io.sparse import is_sparse_file

        streamed = self.streamed
        # Activation files an interrupted run left (e.g. other ranks' when one process resumed a
        # torchrun run) are not part of the model.
        for stale in self.work.glob(ACTIVATION_FILES):
            stale.unlink(missing_ok=True)
        for names, file in zip(self.rest, self.files):
            key = streamed.key
            tensors = streamed.checkpoint.read([key[n] for n in names if n in key], streamed.dtype)
            out = {streamed.out_name[n]: tensors[key[n]] if n in key else streamed.tensor(n) for n in names}
            _save_shard(out, self.work / file)
            self.weight_map.update({name: file for name in out})
            del tensors, out
        total = sum(streamed.stored_bytes(n) for n in streamed.names)
        ordered = {streamed.out_name[n]: self.weight_map[streamed.out_name[n]] for n in streamed.names}
        write_synced(
            self.work / INDEX_FILE,
            json.dumps({"metadata": {"total_size": total}, "weight_map": ordered}, indent=2) + "\n",
        )
        config = streamed.model.config
        config.dtype = streamed.dtype
        if getattr(config, "use_cache", None) is False:  # a causal LM (image classifiers have none)
            config.use_cache = True  # the saved model is for inference; it is off only while pruning
            try:
                config.save_pretrained(self.work)
            finally:
                config.use_cache = False
        else:
            config.save_pretrained(self.work)
        for src in streamed.folder.iterdir():
            if (
                src.is_file()
                and not src.name.startswith(".")
                and src.name not in _NOT_COPIED
                and not src.name.endswith(_NOT_COPIED_SUFFIXES)
                and not is_sparse_file(src)  # streamed from a sparse folder: the output is dense
            ):
                shutil.copyfile(src, self.work / src.name)
        write_synced(self.work / SPARSITY_FILE, record_text(sparsity_record))
        (self.work / PROGRESS_FILE).unlink(missing_ok=True)
        if save_format == "sparse":
            from d2prune.io.models import sparse_pattern
            from d2prune.io.sparse import sparsify_folder

            sparsify_folder(self.work, sparse_pattern(sparsity_record))
        publish_folder(self.work, self.target)
        return self.target
