"""The compute dtype: which dtype forwards run in, apart from the dtype the weights are stored in.

Layer forwards (statistics pass, pruned pass, perplexity, zero-shot, gradients) may run in bfloat16
or float16 while the model keeps its own dtype: ``computing_in`` casts the parameters of the
modules it is given for the duration of a ``with`` block and then puts the very tensors it found
back. So a float32 model is pruned on its float32 weights (the methods' updates never see a rounded
copy) while its matmuls run on AMX or tensor cores, and what is saved keeps ``--dtype``.
Statistics are accumulated in float32/float64 by the methods whatever the forward's dtype.

``auto`` means bfloat16 where the device computes it fast (CUDA with compute capability ≥ 8.0; a
CPU with AMX or AVX512-BF16, detected at run time), float32 elsewhere. ``model`` means the dtype
the model was loaded in (the behaviour before the option existed).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn as nn

from d2prune.errors import UserError

COMPUTE_DTYPES = ("model", "auto", "float32", "bfloat16", "float16")
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ComputeDtype:
    """A resolved compute dtype: ``dtype`` None means the model's own; ``reason`` says why."""

    requested: str
    dtype: torch.dtype | None
    reason: str

    def name(self, model_dtype: torch.dtype | None = None) -> str:
        dtype = self.dtype or model_dtype
        return str(dtype).removeprefix("torch.") if dtype is not None else "model"

    def to_dict(self, model_dtype: torch.dtype | None = None) -> dict[str, str]:
        return {"requested": self.requested, "dtype": self.name(model_dtype), "reason": self.reason}


def check_compute_dtype(name: str) -> str:
    """``name`` normalised, or a one-line error naming the choices."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key in ("model", "auto"):
        return key
    if key not in _DTYPES:
        raise UserError(f"unknown compute dtype {name!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    return str(_DTYPES[key]).removeprefix("torch.")


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_bfloat16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` runs bfloat16 matmuls faster than float32, and what was detected."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        major, minor = torch.cuda.get_device_capability(device)
        fast = major >= 8
        return fast, f"CUDA compute capability {major}.{minor} ({'≥' if fast else '<'} 8.0)"
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        avx = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        flags = _cpu_flags()
        if (amx is not None and amx()) or "amx_bf16" in flags:
            return True, "CPU with AMX"
        if (avx is not None and avx()) or "avx512_bf16" in flags:
            return True, "CPU with AVX512-BF16"
        return False, "CPU without AMX or AVX512-BF16"
    return False, f"{device.type} device (no fast-bfloat16 detection)"


def resolve_compute_dtype(name: str, device: torch.device | str) -> ComputeDtype:
    """The dtype forwards run in on ``device`` for the requested ``name`` (see the module docstring)."""
    key = check_compute_dtype(name)
    if key == "model":
        return ComputeDtype(key, None, "the model's dtype (--compute-dtype model)")
    if key == "auto":
        fast, why = fast_bfloat16(device)
        if fast:
            return ComputeDtype(key, torch.bfloat16, f"auto: {why}")
        return ComputeDtype(key, torch.float32, f"auto: {why}")
    return ComputeDtype(key, _DTYPES[key], "requested")


def as_dtype(
    compute: ComputeDtype | torch.dtype | str | None, device: torch.device | str = "cpu"
) -> torch.dtype | None:
    """A dtype (or None: the model's own) from any of the forms the API accepts."""
    if compute is None or isinstance(compute, torch.dtype):
        return compute
    if isinstance(compute, str):
        compute = resolve_compute_dtype(compute, device)
    return compute.dtype


def own_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters registered on ``modules`` themselves, not on their submodules."""
    return [p for m in modules for p in m.parameters(recurse=False)]


def _parameters(what: nn.Module | Iterable[nn.Module | nn.Parameter]) -> Iterator[nn.Parameter]:
    for item in [what] if isinstance(what, nn.Module) else what:
        if isinstance(item, nn.Module):
            yield from item.parameters()
        else:
            yield item


@contextmanager
def computing_in(
    modules: nn.Module | Iterable[nn.Module | nn.Parameter], dtype: torch.dtype | None, *, frozen_only: bool = False
) -> Iterator[None]:
    """The floating-point parameters of ``modules`` (and their submodules; or parameters given
    directly) in ``dtype`` for the body; with ``frozen_only`` those that do not require grad.

    Afterwards each parameter gets back the tensor it had, so nothing is rounded by the round trip
    and changes made to the weights *outside* the body stay. Buffers are left alone: rotary
    frequencies and the like are meant to stay float32 (the model casts their results itself).
    Parameters on the meta device (a streamed model's absent weights) are skipped. ``dtype`` None:
    nothing changes.
    """
    if dtype is None:
        yield
        return
    saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    try:
        for param in _parameters(modules):
            if id(param) in saved or param.is_meta or not param.is_floating_point() or param.dtype == dtype:
                continue
            if frozen_only and param.requires_grad:
                continue
            saved[id(param)] = (param, param.data)
            param.data = param.data.to(dtype)
        yield
    finally:
        for param, data in saved.values():
            param.data = data
