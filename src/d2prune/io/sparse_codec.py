"""Encode one tensor of a pruned model compactly and decode it back bit for bit.

A tensor is encoded by its raw bits, never by its value: a position is *stored* when its bits are not
all zero, i.e. not ``+0.0``. Pruned weights are ``+0.0`` (the methods assign 0), so they cost one
mask bit; a ``-0.0`` (a refit or a merge can give one) is stored like any kept value, so the sign of
every zero survives without a separate sign map. A kept weight that is exactly ``+0.0`` is stored as
"not stored" and decodes to the same ``+0.0``: the mask describes the bytes, the sparsity record
describes the pruning.

Two layouts (``name#values`` holds the stored values in the tensor's own dtype, in row-major order):

- ``bitmask``: ``name#mask``, one bit per element (``numpy.packbits``, little bit order).
- ``nm``: for an N:M pattern (N zeros in each group of M consecutive inputs of a row, K = M - N
  kept), ``name#index``: K in-group positions per group, ⌈log2 M⌉ bits each, packed the same way
  (2:4 → two 2-bit indices per group, the layout of semi-structured sparse kernels). Used when it
  is no bigger than the bitmask and every group has at most K stored positions; a group with fewer
  stores its first ``+0.0`` positions as padding.

``encode`` returns None when the encoding would not be smaller than the dense tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from d2prune.errors import UserError

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SEP = "#"  # stored names are ``<tensor name>#values`` etc.; '#' never appears in a module path


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def _pack(flags: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(flags.reshape(-1).numpy(), bitorder="little"))


def _unpack(packed: torch.Tensor, count: int) -> np.ndarray:
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    if bits.size != count:
        raise ValueError(f"holds {bits.size} bits, expected {count}")
    return bits


def index_bits(m: int) -> int:
    """Bits of one in-group position of a group of ``m``."""
    return max((m - 1).bit_length(), 1)


def encode(t: torch.Tensor, nm: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``({suffix: tensor}, entry)`` for a floating tensor, or None when storing it dense is as small."""
    if not t.is_floating_point() or t.ndim < 2 or t.numel() == 0 or t.element_size() not in _INT_VIEW:
        return None
    t = t.detach().cpu()
    bits = _bits(t)
    stored = bits != 0
    n_stored = int(stored.sum())
    size = t.element_size()
    entry: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if nm is not None:
        out = _encode_nm(bits, stored, nm)
        if out is not None and out[0] * size + out[1].numel() < t.numel() * size:
            _, index, sel = out
            values = bits.reshape(-1)[sel.reshape(-1)].view(t.dtype)
            return {"values": values, "index": index}, {**entry, "layout": "nm", "n": nm[0], "m": nm[1]}
    if n_stored * size + (t.numel() + 7) // 8 >= t.numel() * size:
        return None
    flat = stored.reshape(-1)
    values = bits.reshape(-1)[flat].view(t.dtype)
    return {"values": values, "mask": _pack(flat)}, {**entry, "layout": "bitmask"}


def _encode_nm(bits: torch.Tensor, stored: torch.Tensor, nm: tuple[int, int]):
    """``(stored count, packed index, selection)`` in the N:M layout, or None if it does not fit."""
    n, m = nm
    k = m - n
    b = index_bits(m)
    if not 0 < n < m or k * b > m or bits.shape[-1] % m:
        return None  # the bitmask is smaller (e.g. 4:8), or the rows do not split into groups
    groups = stored.reshape(-1, m)
    count = groups.sum(1, keepdim=True)
    if bool((count > k).any()):
        return None
    # Every stored position, then the first +0.0 positions of the group up to K.
    zero_rank = (~groups).cumsum(1) - 1
    sel = groups | (~groups & (zero_rank < (k - count)))
    pos = torch.arange(m, dtype=torch.int64).expand_as(groups)[sel]
    shifts = torch.arange(b, dtype=torch.int64)
    flags = ((pos.unsqueeze(1) >> shifts) & 1).to(torch.bool)
    return groups.shape[0] * k, _pack(flags), sel


def decode(entry: dict, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense tensor ``entry`` and its stored ``parts`` (``values``, ``mask`` or ``index``) describe.

    Raises ValueError when the parts do not fit the entry (a damaged file)."""
    dtype = getattr(torch, entry["dtype"])
    shape = tuple(int(s) for s in entry["shape"])
    numel = int(np.prod(shape, dtype=np.int64))
    values = parts["values"]
    if values.dtype != dtype or values.ndim != 1:
        raise ValueError(f"values are {values.dtype} {tuple(values.shape)}, expected 1-D {dtype}")
    vbits = _bits(values)
    if entry["layout"] == "bitmask":
        stored = torch.from_numpy(_unpack(parts["mask"], numel).view(np.bool_))
        if int(stored.sum()) != values.numel():
            raise ValueError(f"the mask marks {int(stored.sum())} values, the file holds {values.numel()}")
        out = torch.zeros(numel, dtype=vbits.dtype)
        out[stored] = vbits
        return out.view(dtype).reshape(shape)
    if entry["layout"] == "nm":
        n, m = int(entry["n"]), int(entry["m"])
        k, b = m - n, index_bits(m)
        if not 0 < n < m or numel % m:
            raise ValueError(f"pattern {n}:{m} does not fit shape {shape}")
        groups = numel // m
        if values.numel() != groups * k:
            raise ValueError(f"holds {values.numel()} values, expected {groups * k}")
        flags = _unpack(parts["index"], groups * k * b).reshape(-1, b).astype(np.int64)
        pos = torch.from_numpy(flags @ (1 << np.arange(b, dtype=np.int64))).reshape(groups, k)
        # Positions strictly increase within a group: none out of range, none twice.
        if bool((pos >= m).any()) or (k > 1 and bool((pos[:, 1:] <= pos[:, :-1]).any())):
            raise ValueError("in-group positions out of order or out of range")
        out = torch.zeros(groups, m, dtype=vbits.dtype)
        out.scatter_(1, pos, vbits.reshape(groups, k))
        return out.view(dtype).reshape(shape)
    raise ValueError(f"unknown layout {entry['layout']!r}")


def check_entry(name: str, entry: Any) -> None:
    """A UserError unless ``entry`` is a well-formed index entry."""
    ok = (
        isinstance(entry, dict)
        and entry.get("layout") in ("dense", "bitmask", "nm")
        and isinstance(entry.get("file"), str)
        and (
            entry.get("layout") == "dense"
            or (
                isinstance(entry.get("shape"), list)
                and isinstance(getattr(torch, str(entry.get("dtype")), None), torch.dtype)
            )
        )
    )
    if not ok:
        raise UserError(f"the sparse index entry of {name} is malformed: {entry!r}")
