"""Where the calibration activations of the layer walk live: in memory, or in memory-mapped files.

The walk needs two buffers of shape (windows, tokens, hidden) in the model dtype: the inputs of the
current decoder layer and its outputs; they swap roles after every layer. ``ram`` keeps them on the
compute device; ``disk`` maps two files (``activations-0.bin``, ``activations-1.bin``; under torchrun
each rank maps its own pair, ``activations-0.rank1.bin`` ...) so only the pages in use are resident;
``auto`` picks disk when both buffers would take more than a fraction of the available memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2prune.errors import UserError

MODES = ("auto", "ram", "disk")
FILES = ("activations-0.bin", "activations-1.bin")
# Every activation file of any rank (see ``file_names``), for cleaning up what an interrupted run left.
PATTERN = "activations-*.bin"


def file_names(rank: int | None = None) -> tuple[str, str]:
    """The two buffer files; under torchrun each rank has its own (``activations-0.rank1.bin``)."""
    if rank is None:
        return FILES
    return tuple(f.replace(".bin", f".rank{rank}.bin") for f in FILES)  # type: ignore[return-value]


def available_memory() -> int:
    """Bytes of memory the kernel says can be used without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_mode(mode: str, what: str = "activation offload") -> str:
    if mode not in MODES:
        raise UserError(f"unknown {what} mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Activations:
    """The two activation buffers (``inps``, ``outs``), allocated on first use.

    ``folder`` holds the files in disk mode (a temporary folder, deleted on ``close``, when None).
    ``rank``: under torchrun, the rank whose share of the windows these buffers hold (its files'
    names carry it, so ranks can share a folder); None on one process.
    """

    def __init__(
        self,
        mode: str,
        device: torch.device,
        folder: str | Path | None = None,
        threshold: float = 0.5,
        rank: int | None = None,
    ):
        self.mode = check_mode(mode)
        self.device = torch.device(device)
        self.folder = Path(folder) if folder is not None else None
        self.files = file_names(rank)
        self.threshold = threshold
        self.storage: str | None = None
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self.current = 0  # index of the buffer that holds the current layer's inputs
        self._buffers: list[torch.Tensor] = []
        self._maps: list[np.memmap] = []
        self._own_folder = False

    # ---------------------------------------------------------------------------------------------
    @property
    def allocated(self) -> bool:
        return bool(self._buffers)

    @property
    def inps(self) -> torch.Tensor:
        return self._buffers[self.current]

    @property
    def outs(self) -> torch.Tensor:
        return self._buffers[1 - self.current]

    @property
    def nbytes(self) -> int:
        """Bytes of both buffers together (0 before allocation)."""
        if self.shape is None or self.dtype is None:
            return 0
        return 2 * int(np.prod(self.shape)) * self.dtype.itemsize

    def swap(self) -> None:
        """The outputs just written become the next layer's inputs."""
        self.current = 1 - self.current

    # ---------------------------------------------------------------------------------------------
    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Create both buffers, choosing the storage now that their size is known."""
        self.shape, self.dtype = tuple(shape), dtype
        storage = self.mode
        if storage == "auto":
            storage = "disk" if self.nbytes > self.threshold * available_memory() else "ram"
        self.storage = storage
        if storage == "ram":
            self._buffers = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(2)]
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="d2prune-activations-"))
            self._own_folder = True
        self._map_files("w+")

    def reopen(self, shape: tuple[int, ...], dtype: torch.dtype, current: int) -> bool:
        """Map the existing files of an earlier run (resume); False when they are missing or of
        another size, in which case nothing is allocated."""
        if self.folder is None:
            return False
        size = int(np.prod(shape)) * dtype.itemsize
        if not all((self.folder / f).is_file() and (self.folder / f).stat().st_size == size for f in self.files):
            return False
        self.shape, self.dtype, self.storage, self.current = tuple(shape), dtype, "disk", current
        self._map_files("r+")
        return True

    def _map_files(self, mode: str) -> None:
        assert self.folder is not None and self.shape is not None and self.dtype is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        size = int(np.prod(self.shape)) * self.dtype.itemsize
        # numpy has no bfloat16: map raw bytes and let torch view them in the model dtype.
        self._maps = [np.memmap(self.folder / f, dtype=np.uint8, mode=mode, shape=(size,)) for f in self.files]
        self._buffers = [torch.from_numpy(m).view(self.dtype).view(self.shape) for m in self._maps]

    def flush(self) -> None:
        """Push the mapped pages to disk (a resume after a machine crash reads them back)."""
        for m in self._maps:
            m.flush()

    def describe(self) -> dict[str, Any]:
        """What the run record says about the activations."""
        return {
            "storage": self.storage,
            "mode": self.mode,
            "bytes": self.nbytes,
            "shape": list(self.shape) if self.shape else None,
            "dtype": _dtype_name(self.dtype) if self.dtype else None,
            "path": str(self.folder) if self.storage == "disk" else None,
        }

    def close(self, delete: bool = True) -> None:
        """Drop the buffers; with ``delete`` also the files (and our temporary folder)."""
        self._buffers, maps, self._maps = [], self._maps, []
        del maps  # unmaps
        if delete and self.storage == "disk" and self.folder is not None:
            if self._own_folder:
                shutil.rmtree(self.folder, ignore_errors=True)
            else:
                for f in self.files:
                    (self.folder / f).unlink(missing_ok=True)
                try:
                    self.folder.rmdir()  # only if nothing else lives there
                except OSError:
                    pass
