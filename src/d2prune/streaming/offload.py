"""Models larger than memory: stream decoder layers from the safetensors shards, write pruned ones out.

The model is built on the meta device (no weights; buffers such as rotary frequencies are real).
Each decoder layer's tensors are read when its turn comes (``safe_open``, one shard file at a time,
copied into owned memory so no file mapping outlives the read), run and pruned by the same per-layer
code path as in-memory pruning (``pipeline.prune`` with a ``StreamedStore``), written to their own
output shard and freed. The embeddings are loaded for the layer-0 capture only; the output head never
is. The output is a normal sharded checkpoint (``model.safetensors.index.json``) that
``from_pretrained`` loads, with config, tokenizer and generation files copied and ``sparsity.json``.

Everything is written into ``.{name}.partial`` next to the output folder, which is renamed into place
only when complete. After each layer, ``progress.json`` there records the next layer, the tensors
written, the activation files and the RNG state; ``prune_checkpoint(..., resume=True)`` (CLI
``--resume OUT``) continues from it and gives a result identical to an uninterrupted run: from the
activation file when it was kept on disk, else by re-running the already pruned layers.

Testing aid: with the environment variable ``D2PRUNE_KILL_AFTER_LAYER=k`` the process kills itself
(SIGKILL) right after layer k's progress is recorded, to test resuming after a crash.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from d2prune.engine import distributed
from d2prune.engine.activations import PATTERN as ACTIVATION_FILES
from d2prune.engine.activations import Activations, available_memory
from d2prune.engine.architecture import DecoderStack, find_decoder_stack
from d2prune.config import PruneConfig
from d2prune.report import LinearReport, PruneReport
from d2prune.errors import UserError
from d2prune.engine.walk import LayerStore, _Catcher, calibration_batches, capture_inputs_and_arguments, forward_layers, prune

INDEX_FILE = "model.safetensors.index.json"
PROGRESS_FILE = "progress.json"
PROGRESS_FORMAT = 1
KILL_ENV = "D2PRUNE_KILL_AFTER_LAYER"
RESUME_UNDER_TORCHRUN = (
    "--resume cannot run under torchrun: resume the interrupted run in one process (without torchrun)"
)

# safetensors header dtype names → torch dtypes (the ones checkpoints hold).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Files of a model folder that are weights or that we write ourselves; every other top-level file
# (tokenizer, generation config, chat template, licence) is copied to the output as is.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_NOT_COPIED = {INDEX_FILE, "pytorch_model.bin.index.json", "config.json", "sparsity.json", PROGRESS_FILE}


def limit_heap_retention(threshold: int = 4 << 20) -> None:
    """Have glibc serve blocks of ``threshold`` bytes and more straight from the OS and return them
    on free. By default its threshold grows to the size of freed blocks (up to 32 MiB), after which
    each layer's tensors come from the heap, which fragments and keeps growing layer after layer
    (measured: +28 MiB per 0.25B-model layer, none with this). No-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (setting it also stops the growth)
        libc.mallopt(-1, 128 << 10)  # M_TRIM_THRESHOLD: back to glibc's default, which the growth raised
    except (OSError, AttributeError):
        pass


def _torch_dtype(name: str) -> torch.dtype:
    from d2prune.io.models import _torch_dtype as parse

    return parse(name)


# --------------------------------------------------------------------------------------------------
# reading checkpoints
# --------------------------------------------------------------------------------------------------


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes), without touching the data."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    return header


class Checkpoint:
    """The tensors of a folder of safetensors files, read a few at a time.

    ``weight_map`` (tensor name → file name) defaults to the folder's index, or to every
    ``*.safetensors`` file in it.
    """

    def __init__(self, folder: str | Path, weight_map: dict[str, str] | None = None):
        self.folder = Path(folder)
        if weight_map is None:
            weight_map = self._find_weight_map()
        self.weight_map = dict(weight_map)
        self._headers: dict[str, dict] = {}

    def _find_weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{index} is not a valid safetensors index: {exc}") from None
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise UserError(
                f"{self.folder} holds no .safetensors weights: streaming from disk (--offload disk) needs a "
                "local model folder in safetensors format"
            )
        return {name: f.name for f in files for name in _read_header(f)}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """Stored dtype and shape of tensor ``name``."""
        file = self.weight_map[name]
        if file not in self._headers:
            self._headers[file] = _read_header(self.folder / file)
        entry = self._headers[file][name]
        return _ST_DTYPES.get(entry["dtype"], torch.float32), tuple(entry["shape"])

    def read(self, names: list[str], dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Tensors ``names``; floating-point ones in ``dtype`` (as ``from_pretrained`` casts them).

        Each file is opened once per call and closed before returning: ``safe_open`` maps the file,
        and the copies keep no page of it resident.
        """
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as fh:
                for name in file_names:
                    t = fh.get_tensor(name)
                    target = dtype if t.is_floating_point() else t.dtype
                    # copy=True: the tensor must own its memory (it gets pruned in place, and the
                    # mapping must not stay resident).
                    out[name] = t.to(device=device, dtype=target, copy=True)
                    del t
        return out

    def files_fingerprint(self) -> list[list]:
        """(file, size, mtime) of every weight file: a resumed run must read the same checkpoint."""
        out = []
        for file in sorted(set(self.weight_map.values())):
            st = (self.folder / file).stat()
            out.append([file, st.st_size, st.st_mtime_ns])
        return out


def is_streamable(model: str | Path) -> bool:
    """A local model folder with config.json and safetensors weights."""
    path = Path(model).expanduser()
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def checkpoint_bytes(folder: str | Path, dtype: str) -> int:
    """Bytes the model's weights take in memory in ``dtype`` (from the file headers)."""
    ckpt = Checkpoint(folder)
    itemsize = _torch_dtype(dtype).itemsize
    total = 0
    for name in ckpt.weight_map:
        stored, shape = ckpt.info(name)
        numel = int(torch.Size(shape).numel())
        total += numel * (itemsize if stored.is_floating_point else stored.itemsize)
    return total


def resolve_offload(mode: str, model: str, dtype: str, threshold: float) -> dict[str, Any]:
    """Decide whether to stream ``model`` from disk: ``disk``, ``none``, or ``auto`` (disk when its
    weights in ``dtype`` exceed ``threshold`` × the available memory). Returns the decision with the
    sizes it was based on, for the run record."""
    if mode not in ("auto", "disk", "none"):
        raise UserError(f"unknown offload mode {mode!r}: choose auto, disk or none")
    streamable = is_streamable(model)
    if mode == "disk" and not streamable:
        raise UserError(
            f"--offload disk streams safetensors from a local model folder; {model} is not one "
            "(a .gguf file, the smollm2-135m alias and Hub ids load in memory: use --offload none)"
        )
    decision: dict[str, Any] = {"mode": mode, "threshold": threshold}
    if streamable:
        decision["weights_bytes"] = checkpoint_bytes(model, dtype)
        decision["available_bytes"] = available_memory()
    if mode == "auto":
        mode = "disk" if streamable and decision["weights_bytes"] > threshold * decision["available_bytes"] else "none"
    decision["weights"] = mode
    return decision


# --------------------------------------------------------------------------------------------------
# the meta-device model
# --------------------------------------------------------------------------------------------------


class StreamedModel:
    """A causal LM built without weights; parts of it are loaded from a checkpoint on demand.

    Tensor names are the model's own (``state_dict`` names, the first of tied ones), which are also
    the names the output checkpoint uses.
    """

    def __init__(self, folder: str | Path, dtype: str = "float32"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        limit_heap_retention()
        self.folder = Path(folder).expanduser()
        if not is_streamable(self.folder):
            raise UserError(f"{self.folder} is not a model folder with config.json and safetensors weights")
        self.dtype = _torch_dtype(dtype)
        self.checkpoint = Checkpoint(self.folder)
        try:
            config = AutoConfig.from_pretrained(str(self.folder))
            # Buffers stay real: rotary frequencies and the like are computed, not stored.
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"could not build the model of {self.folder}: {exc}") from None
        model.tie_weights()
        model.eval()
        model.config.use_cache = False
        self.model = model
        self.stack: DecoderStack = find_decoder_stack(model)

        # Every slot a parameter occupies (tied weights occupy two), under its first name.
        self._slots: dict[str, list[tuple[nn.Module, str]]] = {}
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            canonical = first.setdefault(id(param), name)
            owner, _, attr = name.rpartition(".")
            self._slots.setdefault(canonical, []).append((model.get_submodule(owner), attr))
        persistent = set(model.state_dict(keep_vars=True))
        self._buffers = [n for n, _ in model.named_buffers() if n in persistent]
        self.names = list(self._slots) + self._buffers
        self.key, self.out_name = self._name_maps()
        missing = [n for n in self._slots if n not in self.key]
        if missing:
            raise UserError(
                f"{self.folder}: no tensor for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                "in the checkpoint; streaming needs its names to match the model's (use --offload none)"
            )
        self._head = self._head_only_names()

    def _name_maps(self) -> tuple[dict[str, str], dict[str, str]]:
        """Model name → checkpoint name (as ``from_pretrained`` renames keys on loading), and model
        name → output name (as ``save_pretrained`` renames them back, e.g. GPT-NeoX's ``embed_out``)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
            revert_weight_conversion,
        )

        model = self.model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict(keep_vars=True)
        key: dict[str, str] = {}
        for stored in self.checkpoint.weight_map:
            name, converter = rename_source_key(stored, renamings, converters, model.base_model_prefix, meta)
            if name not in meta and stored in meta:
                name, converter = stored, None
            if name not in meta:
                continue  # e.g. a stored rotary table the model computes itself
            if converter is not None:
                raise UserError(
                    f"{self.folder}: {stored} is converted on loading (fused or split tensors); streaming "
                    "reads tensors one to one: use --offload none"
                )
            key[name] = stored
        placeholders = {n: torch.empty(tuple(self.tensor(n).shape), device="meta") for n in self.names}
        by_id = {id(t): name for name, t in revert_weight_conversion(model, dict(placeholders)).items()}
        out_name = {n: by_id.get(id(t), n) for n, t in placeholders.items()}
        return key, out_name

    def _head_only_names(self) -> set[str]:
        """Parameters that only the output head uses (an untied lm_head): never needed to prune."""
        head = self.model.get_output_embeddings()
        if head is None:
            return set()
        return {
            name for name, slots in self._slots.items() if all(module is head for module, _ in slots)
        }

    # ---------------------------------------------------------------------------------------------
    def layer_prefix(self, index: int) -> str:
        return f"{self.stack.path}.{index}."

    def names_under(self, prefix: str) -> list[str]:
        return [n for n in self.names if n.startswith(prefix)]

    def outside_names(self, head: bool = False) -> list[str]:
        """Tensors outside the decoder stack (without the head-only ones unless ``head``)."""
        stack = self.stack.path + "."
        return [n for n in self.names if not n.startswith(stack) and (head or n not in self._head)]

    def load(self, names: list[str], device: torch.device | str, source: Checkpoint | None = None) -> None:
        """Read tensors ``names`` from ``source`` (default: the input checkpoint) into the model.

        A persistent buffer absent from the checkpoint keeps the value the model computed.
        """
        source = source or self.checkpoint
        keys = {n: (self.key.get(n) if source is self.checkpoint else self.out_name[n]) for n in names}
        present = [n for n in names if keys[n] is not None and keys[n] in source]
        absent = [n for n in names if n in self._slots and n not in present]
        if absent:
            raise RuntimeError(f"{source.folder} has no tensor {absent[0]}")
        tensors = source.read([keys[n] for n in present], self.dtype, device)
        for name in present:
            self._set(name, tensors.pop(keys[name]))

    def release(self, names: list[str]) -> None:
        """Free parameters ``names`` (back to the meta device); buffers are small and stay."""
        for name in names:
            if name in self._slots:
                module, attr = self._slots[name][0]
                p = getattr(module, attr)
                self._set(name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._slots:
            param = nn.Parameter(tensor, requires_grad=False)
            for module, attr in self._slots[name]:
                module._parameters[attr] = param
        else:
            owner, _, attr = name.rpartition(".")
            self.model.get_submodule(owner)._buffers[attr] = tensor

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._slots:
            module, attr = self._slots[name][0]
            return getattr(module, attr).data
        return self.model.get_buffer(name)

    def materialized(self) -> list[str]:
        """Names of the parameters that currently hold data (not on the meta device)."""
        return [n for n in self._slots if not self.tensor(n).is_meta]

    @contextmanager
    def loaded(self, names: list[str], device: torch.device | str) -> Iterator[None]:
        self.load(names, device)
        try:
            yield
        finally:
            self.release(names)

    def stored_bytes(self, name: str) -> int:
        """Bytes of tensor ``name`` as written to the output (floating point in the model dtype)."""
        key = self.key.get(name)
        if key is None:
            t = self.tensor(name)
            return t.numel() * t.dtype.itemsize
        stored, shape = self.checkpoint.info(key)
        itemsize = self.dtype.itemsize if stored.is_floating_point else stored.itemsize
        return int(torch.Size(shape).numel()) * itemsize


class StreamingLayers(LayerStore):
    """Layers read from the checkpoint for their turn and freed after it (nothing is written)."""

    def __init__(self, streamed: StreamedModel):
        super().__init__()
        self.streamed = streamed

    @contextmanager
    def outside_stack(self, device: torch.device) -> Iterator[None]:
        with self.streamed.loaded(self.streamed.outside_names(), device):
            yield

    def fetch(self, index: int, layer: nn.Module, device: torch.device, pruned: bool = False) -> None:
        self.streamed.load(self.streamed.names_under(self.streamed.layer_prefix(index)), device)

    def release(self, index: int, layer: nn.Module, save: bool) -> None:
        self.streamed.release(self.streamed.names_under(self.streamed.layer_prefix(index)))


# --------------------------------------------------------------------------------------------------
# pruning with the output written as it goes
# --------------------------------------------------------------------------------------------------


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


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors shard via a temporary name, synced: a listed shard is a complete one."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; save_pretrained's files are world-readable
    os.replace(tmp, path)


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
        progress = self.progress
        if progress.get("format") != PROGRESS_FORMAT:
            raise UserError(f"{self.work / PROGRESS_FILE} was written by another d2prune version; delete {self.work}")
        old = progress["fingerprint"]
        changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
        if changed:
            raise UserError(
                f"cannot resume {self.work}: {', '.join(changed)} differ from the interrupted run "
                f"(repeat its command; or delete {self.work} to start over)"
            )
        threads = progress.get("torch_threads")
        if threads != torch.get_num_threads():
            # Float sums are split differently across threads: still a valid result, not a bit-identical one.
            print(f"d2prune: warning: the interrupted run used {threads} torch threads, this one "
                  f"{torch.get_num_threads()}; the result may differ from an uninterrupted run in the last bits",
                  file=sys.stderr)
        ranks = progress.get("ranks", 1)
        if ranks != self.world.size:
            # Its ranks summed the statistics in another order; its activation files were per rank,
            # so the pruned layers are re-run here.
            print(f"d2prune: warning: the interrupted run ran on {ranks} ranks (torchrun), this one on "
                  f"{self.world.size}; the result may differ from an uninterrupted run in the last bits",
                  file=sys.stderr)
        saved = progress["report"]
        report.linears = [LinearReport(**d) for d in saved["linears"]]
        report.zeros, report.weights = saved["zeros"], saved["weights"]
        report.layer_sparsities = saved["layer_sparsities"]
        report.outlier_ratios = saved["outlier_ratios"]
        report.timings = dict(saved["timings"])
        report.resumed_at_layer = progress["next_layer"]
        report.activations = progress["activations"]
        self.weight_map = dict(progress["weight_map"])
        self._rng = progress["rng"]
        return progress["next_layer"]

    def activations(self, config: PruneConfig, device: torch.device) -> Activations:
        acts = Activations(config.activation_offload, device, self.work, config.offload_threshold,
                           rank=self.world.file_rank)
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
        from d2prune.io.record import write_json_atomic

        activations.flush()
        if self.world.rank > 0:  # rank 0 records the progress (its own activation files)
            self._kill_if_asked(index)
            return
        saved = activations.describe()
        saved["current"] = activations.current
        write_json_atomic(self.work / PROGRESS_FILE, {
            "format": PROGRESS_FORMAT,
            "fingerprint": self.fingerprint,
            "next_layer": index + 1,
            "num_layers": len(self.layers),
            "weight_map": self.weight_map,
            "activations": saved,
            "rng": _rng_state(),
            "torch_threads": torch.get_num_threads(),
            "ranks": self.world.size,
            "report": {
                "linears": [lin.to_dict() for lin in report.linears],
                "zeros": report.zeros,
                "weights": report.weights,
                "layer_sparsities": report.layer_sparsities,
                "outlier_ratios": report.outlier_ratios,
                "timings": report.timings,
            },
        })
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

    def finish(self, sparsity_record: dict) -> Path:
        """Write the tensors outside the stack, the index, config, tokenizer files and the sparsity
        record, then rename the folder into place (rank 0 only, once every rank has closed its
        activation files)."""
        from d2prune.io.models import SPARSITY_FILE, move_into_place, record_text, write_synced

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
        write_synced(self.work / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": ordered}, indent=2) + "\n")
        config = streamed.model.config
        config.dtype = streamed.dtype
        config.use_cache = True  # the saved model is for inference; it is off only while pruning
        try:
            config.save_pretrained(self.work)
        finally:
            config.use_cache = False
        for src in streamed.folder.iterdir():
            if src.is_file() and not src.name.startswith(".") and src.name not in _NOT_COPIED \
                    and not src.name.endswith(_NOT_COPIED_SUFFIXES):
                shutil.copyfile(src, self.work / src.name)
        write_synced(self.work / SPARSITY_FILE, record_text(sparsity_record))
        (self.work / PROGRESS_FILE).unlink(missing_ok=True)
        move_into_place(self.work, self.target)
        return self.target


def calibration_sha256(batches: list[dict[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key]
            if isinstance(t, torch.Tensor):
                digest.update(key.encode())
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def prune_checkpoint(
    folder: str | Path,
    calibration: Any,
    config: PruneConfig,
    target: str | Path,
    *,
    dtype: str = "float32",
    resume: bool = False,
    streamed: StreamedModel | None = None,
) -> tuple[PruneReport, Path]:
    """Prune the model in ``folder`` (safetensors) layer by layer without ever holding more than one
    decoder layer of it, writing the pruned model to ``target``. Returns the report and ``target``.

    ``resume``: continue an interrupted run into ``target`` (same model, data and config).
    ``streamed``: a ``StreamedModel`` of ``folder`` built by the caller (tests watch it).

    Under torchrun (see ``d2prune.engine.distributed``) every rank reads ``folder``, and rank 0 writes
    ``target``; ``resume`` is refused there (a run that torchrun started can be resumed by one process).
    """
    if config.method.needs_gradients:
        raise UserError(f"{config.method.name} needs a full-model gradient pass; it cannot stream from disk (--offload none)")
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
            store.finish(report.sparsity_record())
    report.timings["write_rest"] = time.perf_counter() - t0
    return report, target


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


# --------------------------------------------------------------------------------------------------
# perplexity of a streamed model
# --------------------------------------------------------------------------------------------------


class _Feeder(_Catcher):
    """Stands in for a decoder layer in the head pass: returns ``value`` (the stack's final hidden
    states) when set, else hands its input on."""

    value: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return self.value if self.value is not None else hidden


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
):
    """Perplexity of the model in ``folder`` computed layer by layer (the same windows and loss as
    ``evaluate.evaluate_ppl``): one decoder layer in memory at a time, then the final norm and head
    applied to the last layer's outputs. Under torchrun each rank runs its share of the windows (every
    rank reads ``folder``) and the per-window NLLs are summed over ranks."""
    from d2prune.evaluation.perplexity import eval_windows, perplexity_result

    world = distributed.current()
    streamed = StreamedModel(folder, dtype)
    dev = torch.device(device)
    windows = eval_windows(tokens, seqlen, batch_size, max_windows)
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


def _streamed_nlls(streamed: StreamedModel, batches: list[dict], dev: torch.device, activation_offload: str,
                   threshold: float, progress: bool) -> list[float]:
    """Per window of ``batches``: the NLL of ``evaluate.window_nlls``, one decoder layer at a time."""
    from d2prune.evaluation.perplexity import window_nlls

    model, stack = streamed.model, streamed.stack
    sizes = [b["input_ids"].shape[0] for b in batches]
    store = StreamingLayers(streamed)
    acts = Activations(activation_offload, dev, None, threshold)
    try:
        with store.outside_stack(dev):
            _, extras = capture_inputs_and_arguments(model, stack, batches, dev, acts)
        forward_layers(stack, store, acts, extras, sizes, range(len(stack.layers)), dev, pruned=False,
                       progress=progress, desc="perplexity (layers)")
        feeders = [_Feeder(layer) for layer in stack.layers]
        originals = list(stack.layers)
        nlls: list[float] = []
        head = streamed.outside_names(head=True)
        try:
            for i, feeder in enumerate(feeders):
                stack.layers[i] = feeder
            with streamed.loaded(head, dev):
                start = 0
                for batch, size in tqdm(list(zip(batches, sizes)), desc="perplexity (head)", disable=not progress):
                    feeders[0].value = acts.inps[start : start + size].to(dev)
                    ids = batch["input_ids"].to(dev)
                    nlls.extend(window_nlls(model(input_ids=ids, use_cache=False).logits, ids))
                    start += size
        finally:
            for i, layer in enumerate(originals):
                stack.layers[i] = layer
    finally:
        acts.close()
    return nlls
