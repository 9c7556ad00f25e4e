"""Who runs what of a layer's work: one process (``Local``), or data-parallel ranks (``DataParallel``).

The layer code asks its executor to share the calibration windows, sum statistics, say which
linears this process prunes, share the pruned weights and permutations, and to turn an error on one
rank into an error on every rank (``sync``). It never tests how many processes there are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from d2prune.engine import distributed
from d2prune.engine.capture import batch_rows

# Per linear: (relative error, error before the refit, seconds), the first two None when not measured.
Done = dict[str, tuple[float | None, float | None, float]]


def assign(work: dict[str, int], size: int) -> dict[str, int]:
    """Owner rank of each linear: largest work first, each to the least loaded rank (the lowest on
    ties). Depends only on the weights' shapes, so every rank computes the same assignment."""
    load = [0] * size
    owners: dict[str, int] = {}
    for name in sorted(work, key=lambda n: -work[n]):  # stable: equal work keeps module order
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += work[name]
    return owners


def reduce_statistics(
    world: distributed.World, holders: Iterable[Any], what: str, needed_by: Iterable[set[int] | None] | None = None
) -> None:
    """Sum the statistics of ``holders`` (pruners, Grams: anything with ``statistics()`` and
    ``load_statistics()``) over ranks; each distinct holder once, in the given order.

    ``needed_by``: per holder, the ranks that will read its sums (None: every rank). A holder read by
    one rank is reduced to that rank alone (half the traffic of an all-reduce, and no c×c copy on the
    others); the other ranks' copies are left partial and must not be read. Two ranks add the same two
    values either way, so their sums are the same bits as with an all-reduce."""
    if world.size == 1:
        return
    holders = list(holders)
    needs = list(needed_by) if needed_by is not None else [None] * len(holders)
    unique: dict[int, tuple[Any, set[int] | None]] = {}
    for holder, need in zip(holders, needs):
        old = unique.get(id(holder))
        merged = None if need is None or (old is not None and old[1] is None) else {*(old[1] if old else ()), *need}
        unique[id(holder)] = (holder, merged)
    parts = [(holder, need, holder.statistics()) for holder, need in unique.values()]
    world.check_same([(key, tuple(t.shape), str(t.dtype)) for _, _, sums in parts for key, t in sums.items()], what)
    # One collective per destination, in an order every rank computes alike: all ranks first.
    groups: dict[int | None, list[tuple[Any, dict[str, torch.Tensor]]]] = {}
    for holder, need, sums in parts:
        dst = next(iter(need)) if need is not None and len(need) == 1 else None
        groups.setdefault(dst, []).append((holder, sums))
    for dst in sorted(groups, key=lambda d: -1 if d is None else d):
        tensors = [t for _, sums in groups[dst] for t in sums.values()]
        if dst is None:
            world.all_reduce_sum(tensors, what)
        else:
            world.reduce_sum(tensors, dst, what)
        for holder, sums in groups[dst]:
            if dst is None or dst == world.rank:
                holder.load_statistics(sums)


def share_pruned(
    world: distributed.World,
    linears: dict[str, torch.nn.Module],
    owners: dict[str, int],
    done: dict[str, tuple[float | None, float | None, float]],
) -> dict[str, tuple[float | None, float | None, float]]:
    """Broadcast each pruned weight from its owner; returns (relative error, error before the
    refit, seconds) of every linear on every rank (``done`` holds this rank's own)."""
    if world.size == 1:
        return done
    for name, lin in linears.items():
        world.broadcast_(lin.weight.data, owners[name], f"sending the pruned {name}")
    # has error, error, has error before refit, error before refit, seconds
    info = torch.zeros(len(linears), 5, dtype=torch.float64)
    for i, name in enumerate(linears):
        if name in done:
            error, before, seconds = done[name]
            info[i] = torch.tensor(
                [error is not None, error or 0.0, before is not None, before or 0.0, seconds], dtype=torch.float64
            )
    world.all_reduce_sum([info], "sharing the pruning reports")
    return {
        name: (float(row[1]) if row[0] else None, float(row[3]) if row[2] else None, float(row[4]))
        for name, row in zip(linears, info)
    }


class Executor:
    """The interface; its own implementation is one process that does everything."""

    size = 1
    rank = 0
    # The global index of this process's first calibration window (set by ``shard``).
    first_window = 0

    @property
    def file_rank(self) -> int | None:
        """What names this process's files next to other ranks' (None: no rank in file names)."""
        return None

    def shard(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """This process's share of the calibration batches (``first_window`` is set to its first window)."""
        self.first_window = 0
        return batches

    def sync(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Local work that, if it raises on any process, raises on every one."""
        return contextlib.nullcontext()

    def reduce_statistics(
        self, holders: Iterable[Any], what: str, needed_by: Iterable[set[int] | None] | None = None
    ) -> None:
        """Sum the statistics of ``holders`` (pruners, Grams) over the processes, each holder once;
        ``needed_by``: per holder, the processes that read its sums (None: all)."""

    def owners(self, work: dict[str, int]) -> dict[str, int]:
        """The process that prunes each linear, from its relative cost."""
        return {name: 0 for name in work}

    def share_pruned(self, linears: dict[str, nn.Module], owners: dict[str, int], done: Done) -> Done:
        """Give every process each pruned weight; returns ``done`` of every linear (``done``: this process's)."""
        return done

    def share_permutations(self, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every process's input-channel permutations (``perms``: those this process chose)."""
        return perms


class DataParallel(Executor):
    """Ranks of a process group that share the calibration windows (see ``d2prune.engine.distributed``).

    A layer's statistics (each pruner's, and each Gram) are reduced to the rank that prunes the linears
    reading them, when that is one rank (``reduce_statistics``), not all-reduced to all.
    """

    def __init__(self, world: distributed.World):
        self.world = world
        self.size, self.rank = world.size, world.rank

    @property
    def file_rank(self) -> int | None:
        return self.world.file_rank

    def shard(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        local, lo = self.world.shard(batches)
        self.first_window = sum(batch_rows(b) for b in batches[:lo])
        return local

    def sync(self, what: str) -> contextlib.AbstractContextManager[None]:
        return self.world.sync(what)

    def reduce_statistics(
        self, holders: Iterable[Any], what: str, needed_by: Iterable[set[int] | None] | None = None
    ) -> None:
        reduce_statistics(self.world, holders, what, needed_by)

    def owners(self, work: dict[str, int]) -> dict[str, int]:
        return assign(work, self.size)

    def share_pruned(self, linears: dict[str, nn.Module], owners: dict[str, int], done: Done) -> Done:
        return share_pruned(self.world, linears, owners, done)

    def share_permutations(self, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shares = self.world.all_gathered(perms, "sharing the channel permutations")
        return {name: perm for share in shares for name, perm in share.items()}


class Local(Executor):
    """One process (the base class's behaviour, under the name that says so)."""


def current_executor() -> Executor:
    """The executor of the running world: ``DataParallel`` under torchrun, else ``Local``."""
    world = distributed.current()
    return DataParallel(world) if world.size > 1 else Local()
