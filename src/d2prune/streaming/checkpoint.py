"""Reading safetensors checkpoints a few tensors at a time, and the offload decision (stream or load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from d2prune.engine.activations import available_memory
from d2prune.errors import UserError
from d2prune.io.folders import torch_dtype
from d2prune.io.integrity import (
    INDEX_FILE,
    check_model_folder,
    read_json_file,
    safetensors_header,
    safetensors_torch_dtype,
)


def _torch_dtype(name: str) -> torch.dtype:
    return torch_dtype(name)


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes), checked, without touching the data."""
    return safetensors_header(path)


class Checkpoint:
    """The tensors of a folder of safetensors files, read a few at a time.


    ``weight_map`` (tensor name → file name) defaults to the folder's index, or to every
    ``*.safetensors`` file in it.
    """

    def __init__(self, folder: str | Path, weight_map: dict[str, str] | None = None):
        from d2prune.io.sparse import is_sparse_folder, read_index

        self.folder = Path(folder)
        # A sparse folder (d2prune.io.sparse): tensors are decoded shard by shard as they are read.
        self._sparse: dict[str, dict] | None = None
        if weight_map is None and is_sparse_folder(self.folder):
            self._sparse = read_index(self.folder)["tensors"]
            weight_map = {name: entry["file"] for name, entry in self._sparse.items()}
        if weight_map is None:
            weight_map = self._find_weight_map()
        self.weight_map = dict(weight_map)
        self._headers: dict[str, dict] = {}

    def _find_weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            data = read_json_file(index, "safetensors index")
            try:
                return dict(data["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{index} is not a valid safetensors index: {exc!r}") from None
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
        sparse = (self._sparse or {}).get(name)
        if sparse is not None and sparse["layout"] != "dense":
            return _torch_dtype(sparse["dtype"]), tuple(sparse["shape"])
        if file not in self._headers:
            self._headers[file] = _read_header(self.folder / file)
        entry = self._headers[file].get(name)
        if entry is None:
            raise UserError(f"{self.folder / file} does not hold {name}: the checkpoint is damaged or incomplete")
        return safetensors_torch_dtype(entry["dtype"]) or torch.float32, tuple(entry["shape"])

    def read(self, names: list[str], dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Tensors ``names``; floating-point ones in ``dtype`` (as ``from_pretrained`` casts them).


        Each file is opened once per call and closed before returning: ``safe_open`` maps the file,
        and the copies keep no page of it resident.
        """
        from safetensors import SafetensorError, safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            if self._sparse is not None:
                from d2prune.io.sparse import read_shard

                decoded = read_shard(self.folder, file, {n: self._sparse[n] for n in file_names})
                for name, t in decoded.items():
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                del decoded
                continue
            try:
                with safe_open(str(self.folder / file), framework="pt") as fh:
                    for name in file_names:
                        t = fh.get_tensor(name)
                        target = dtype if t.is_floating_point() else t.dtype
                        # copy=True: the tensor must own its memory (it gets pruned in place, and the
                        # mapping must not stay resident).
                        out[name] = t.to(device=device, dtype=target, copy=True)
                        del t
            except (OSError, SafetensorError) as exc:  # changed or damaged since its header was read
                raise UserError(f"cannot read {self.folder / file}: {exc}") from None
        return out

    def files_fingerprint(self) -> list[list]:
        """(file, size, mtime) of every weight file: a resumed run must read the same checkpoint."""
        out = []
        for file in sorted(set(self.weight_map.values())):
            st = (self.folder / file).stat()
            out.append([file, st.st_size, st.st_mtime_ns])
        return out


def is_streamable(model: str | Path) -> bool:
    """A local model folder with config.json and safetensors weights (dense, or a d2prune sparse folder)."""
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
        check_model_folder(model)  # before the sizes are read from it, and before any layer is
        decision["weights_bytes"] = checkpoint_bytes(model, dtype)
        decision["available_bytes"] = available_memory()
    if mode == "auto":
        mode = "disk" if streamable and decision["weights_bytes"] > threshold * decision["available_bytes"] else "none"
    decision["weights"] = mode
    return decision
