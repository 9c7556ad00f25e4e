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
  (2:4 → two 2-bit indices per group, the layout of semi-structured sparse kernels). Used when
  M ≤ 8, it is no bigger than the bitmask and every group has at most K stored positions; a group
  with fewer stores its first ``+0.0`` positions as padding.

``encode`` returns None when the encoding would not be smaller than the dense tensor.
"""

from __future__ import annotations

import functools
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


def index_bits(m: int) -> int:
    """Bits of one in-group position of a group of ``m``."""
    return max((m - 1).bit_length(), 1)


def encode(t: torch.Tensor, nm: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``({suffix: tensor}, entry)`` for a floating tensor, or None when storing it dense is as small."""
    if not t.is_floating_point() or t.ndim < 2 or t.numel() == 0 or t.element_size() not in _INT_VIEW:
        return None
    t = t.detach().cpu()
    bits = _bits(t)
    flat = bits.reshape(-1).numpy()
    stored = flat != 0
    n_stored = int(np.count_nonzero(stored))
    size = t.element_size()
    entry: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if nm is not None:
        out = _encode_nm(flat, stored, nm, t.shape[-1])
        if out is not None and out[0].size * size + out[1].size < t.numel() * size:
            values, index = (torch.from_numpy(a) for a in out)
            return {"values": values.view(t.dtype), "index": index}, {**entry, "layout": "nm", "n": nm[0], "m": nm[1]}
    if n_stored * size + (t.numel() + 7) // 8 >= t.numel() * size:
        return None
    # flatnonzero + take is branch-free: 3-4x faster than boolean indexing (numpy's or torch's).
    values = torch.from_numpy(flat.take(np.flatnonzero(stored))).view(t.dtype)
    mask = torch.from_numpy(np.packbits(stored, bitorder="little"))
    return {"values": values, "mask": mask}, {**entry, "layout": "bitmask"}


@functools.cache
def _nm_tables(m: int, k: int) -> tuple[np.ndarray, ...]:
    """Lookup tables over one group (M ≤ 8 bits): its stored-positions bits → (code, selected bits,
    fits). A code is the K selected positions in increasing order,
    ⌈log2 M⌉ bits each, little-endian; a group with fewer than K stored positions selects its first
    +0.0 positions too."""
    b = index_bits(m)
    code = np.zeros(1 << m, np.uint8)
    sel = np.zeros(1 << m, np.uint8)
    fits = np.zeros(1 << m, np.bool_)
    for v in range(1 << m):
        pos = [j for j in range(m) if v >> j & 1]
        if len(pos) <= k:
            pos = sorted(pos + [j for j in range(m) if not v >> j & 1][: k - len(pos)])
            code[v] = sum(p << (i * b) for i, p in enumerate(pos))
            sel[v] = sum(1 << p for p in pos)
            fits[v] = True
    return code, sel, fits


@functools.cache
def _nm_decode_tables(m: int, k: int, per_byte: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(stored-flags, valid) of every index code: a code is K in-group positions, ⌈log2 M⌉ bits
    each, valid when they strictly increase and lie inside the group. With ``per_byte`` > 1 (a code
    as wide as its group, M dividing 8: 2:4) the tables are over index bytes of that many groups."""
    b = index_bits(m)
    width = k * b
    size = 1 << (8 if per_byte > 1 else width)
    flags = np.zeros(size, np.uint8)
    valid = np.ones(size, np.bool_)
    for code in range(size):
        for j in range(per_byte):
            field = code >> (j * width) & ((1 << width) - 1)
            pos = [field >> (i * b) & ((1 << b) - 1) for i in range(k)]
            if any(q >= m for q in pos) or any(x >= y for x, y in zip(pos, pos[1:])):
                valid[code] = False
            flags[code] |= sum(1 << q for q in set(pos) if q < m) << (j * m)
    return flags, valid


def _pack_fields(values: np.ndarray, width: int) -> np.ndarray:
    """``values`` (uint8, each < 2**width) as one little-endian stream of ``width``-bit fields."""
    if 8 % width:  # 3 or 6 bits: through single bits (slower, and rare)
        flags = np.unpackbits(values[:, None], axis=1, count=width, bitorder="little")
        return np.packbits(flags.reshape(-1), bitorder="little")
    per = 8 // width
    padded = np.zeros(-(-values.size // per) * per, np.uint8)
    padded[: values.size] = values
    padded = padded.reshape(-1, per)
    out = padded[:, 0].copy()
    for j in range(1, per):  # whole bytes at a time: np.packbits along a short axis is ~50x slower
        out |= padded[:, j] << np.uint8(width * j)
    return out


def _unpack_fields(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """The first ``count`` ``width``-bit fields of a stream written by :func:`_pack_fields`."""
    if packed.size != -(-count * width // 8):
        raise ValueError(f"holds {packed.size} bytes, expected {-(-count * width // 8)}")
    if 8 % width:
        flags = np.unpackbits(packed, count=count * width, bitorder="little").reshape(count, width)
        return np.packbits(flags, axis=1, bitorder="little").reshape(-1)
    per = 8 // width
    out = np.empty((packed.size, per), np.uint8)
    for j in range(per):
        out[:, j] = (packed >> np.uint8(width * j)) & np.uint8((1 << width) - 1)
    return out.reshape(-1)[:count]


def _selected_positions(group_sel: np.ndarray, m: int, numel: int) -> np.ndarray:
    """Flat positions of the selected bits of each group (``group_sel``: one byte of M flags per group)."""
    flags = np.unpackbits(_pack_fields(group_sel, m), count=numel, bitorder="little")
    return np.flatnonzero(flags.view(np.bool_))  # nonzero has a fast path for bool, not for uint8


def _encode_nm(flat: np.ndarray, stored: np.ndarray, nm: tuple[int, int], width: int):
    """``(values' bits, packed in-group positions)`` in the N:M layout, or None if it does not fit.

    Table lookups over whole groups (bytes), no per-element arithmetic: as fast as the bitmask."""
    n, m = nm
    k = m - n
    b = index_bits(m)
    if not 0 < n < m or m > 8 or k * b > m or width % m:
        return None  # the bitmask is as small (e.g. 4:8), or the rows do not split into groups
    code, sel, fits = _nm_tables(m, k)
    groups = _unpack_fields(np.packbits(stored, bitorder="little"), m, stored.size // m)
    if not bool(fits[groups].all()):
        return None  # a group stores more than K positions (e.g. a -0.0 among its pruned weights)
    pos = _selected_positions(sel[groups], m, stored.size)
    return flat.take(pos), _pack_fields(code[groups], k * b)


# Elements decoded per step: a step's int64 positions stay in the CPU cache instead of one array of
# 8 bytes per stored weight going through memory, which also bounds the decoder's scratch memory.
_CHUNK = 1 << 18


def _scatter_steps(out: torch.Tensor, vbits: torch.Tensor, steps) -> None:
    """Write ``vbits`` to ``out`` (flat) in order at the positions ``steps`` yields: ``(start, flags)``,
    the stored-flags (bool) of the elements from ``start`` on. ValueError if the counts do not fit."""
    done = 0
    for start, flags in steps:
        pos = np.flatnonzero(flags)  # nonzero has a fast path for bool, not for uint8
        if done + pos.size > vbits.numel():
            raise ValueError(f"the mask marks more values than the file holds ({vbits.numel()})")
        out[start : start + flags.size].scatter_(0, torch.from_numpy(pos), vbits[done : done + pos.size])
        done += pos.size
    if done != vbits.numel():
        raise ValueError(f"the mask marks {done} values, the file holds {vbits.numel()}")


def decode(entry: dict, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense tensor ``entry`` and its stored ``parts`` (``values``, ``mask`` or ``index``) describe.

    Raises ValueError when the parts do not fit the entry (a damaged file)."""
    dtype = getattr(torch, entry["dtype"])
    shape = tuple(int(s) for s in entry["shape"])
    numel = int(np.prod(shape, dtype=np.int64))
    values = parts["values"]
    if values.dtype != dtype or values.ndim != 1:
        raise ValueError(f"values are {values.dtype} {tuple(values.shape)}, expected 1-D {dtype}")
    out = torch.empty(shape, dtype=dtype)
    vbits = _bits(values)
    flat = _bits(out).view(-1)
    flat.zero_()
    if entry["layout"] == "bitmask":
        mask = parts["mask"].numpy()
        if mask.ndim != 1 or mask.size != (numel + 7) // 8:
            raise ValueError(f"holds {mask.size} mask bytes, expected {(numel + 7) // 8}")

        def flags(a: int) -> np.ndarray:
            part = mask[a // 8 : (a + _CHUNK) // 8]
            return np.unpackbits(part, count=min(_CHUNK, numel - a), bitorder="little").view(np.bool_)

        _scatter_steps(flat, vbits, ((a, flags(a)) for a in range(0, numel, _CHUNK)))
        return out
    if entry["layout"] == "nm":
        n, m = int(entry["n"]), int(entry["m"])
        k, b = m - n, index_bits(m)
        if not 0 < n < m or numel % m:
            raise ValueError(f"pattern {n}:{m} does not fit shape {shape}")
        groups = numel // m
        if values.numel() != groups * k:
            raise ValueError(f"holds {values.numel()} values, expected {groups * k}")
        if m > 8:
            raise ValueError(f"pattern {n}:{m}: the nm layout covers groups of at most 8")
        # The index is one little-endian stream of b-bit in-group positions, K per group in order:
        # one K·b-bit code per group. A table turns each code into its group's stored-flags (M bits),
        # so the N:M layout decodes through the bitmask's steps.
        index = parts["index"].numpy()
        if index.ndim != 1 or index.size != -(-groups * k * b // 8):
            raise ValueError(f"holds {index.size} index bytes, expected {-(-groups * k * b // 8)}")
        per = _CHUNK // m // 8 * 8  # groups per step: a multiple of 8, so that each step starts on a byte
        byte_groups = k * b == m and 8 % m == 0  # 2:4: an index byte holds whole groups, as a mask byte does
        tables = {False: _nm_decode_tables(m, k)}
        if byte_groups:
            tables[True] = _nm_decode_tables(m, k, 8 // m)

        def step(g: int) -> np.ndarray:
            count = min(per, groups - g)
            codes = index[g * k * b // 8 : -(-(g + count) * k * b // 8)]
            whole = byte_groups and count * m % 8 == 0  # a last step's padding fields would not be valid codes
            if not whole:
                codes = _unpack_fields(codes, k * b, count)
            flags_of, valid = tables[whole]
            # np.take: twice as fast as indexing with a uint8 array
            if not bool(np.take(valid, codes).all()):
                raise ValueError("in-group positions out of order or out of range")
            packed = np.take(flags_of, codes) if whole else _pack_fields(np.take(flags_of, codes), m)
            return np.unpackbits(packed, count=count * m, bitorder="little").view(np.bool_)

        _scatter_steps(flat, vbits, ((g * m, step(g)) for g in range(0, groups, per)))
        return out
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
