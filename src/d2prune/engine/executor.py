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

# Per linear: (relative error, error before the refit, seconds), the first two None when not measured.
Done = dict[str, tuple[float | None, float | None, float]]


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

    def share_pruned(self, linears: dict[str, nn.Linear], owners: dict[str, int], done: Done) -> Done:
        """Give every process each pruned weight; returns ``done`` of every linear (``done``: this process's)."""
        return done

    def share_permutations(self, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every process's input-channel permutations (``perms``: those this process chose)."""
        return perms


class DataParallel(Executor):
    """Ranks of a process group that share the calibration windows (see ``d2prune.engine.distributed``).

    A layer's statistics (each pruner's, and each Gram) are reduced to the rank that prunes the linears
    reading them, when that is one rank (``distributed.reduce_statistics``), not all-reduced to all.
    """

    def __init__(self, world: distributed.World):
        self.world = world
        self.size, self.rank = world.size, world.rank

    @property
    def file_rank(self) -> int | None:
        return self.world.file_rank

    def shard(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        local, lo = self.world.shard(batches)
        self.first_window = sum(b["input_ids"].shape[0] for b in batches[:lo])
        return local

    def sync(self, what: str) -> contextlib.AbstractContextManager[None]:
        return self.world.sync(what)

    def reduce_statistics(
        self, holders: Iterable[Any], what: str, needed_by: Iterable[set[int] | None] | None = None
    ) -> None:
        distributed.reduce_statistics(self.world, holders, what, needed_by)

    def owners(self, work: dict[str, int]) -> dict[str, int]:
        return distributed.assign(work, self.size)

    def share_pruned(self, linears: dict[str, nn.Linear], owners: dict[str, int], done: Done) -> Done:
        return distributed.share_pruned(self.world, linears, owners, done)

    def share_permutations(self, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shares = self.world.all_gathered(perms, "sharing the channel permutations")
        return {name: perm for share in shares for name, perm in share.items()}


class Local(Executor):
    """One process (the base class's behaviour, under the name that says so)."""


def current_executor() -> Executor:
    """The executor of the running world: ``DataParallel`` under torchrun, else ``Local``."""
    world = distributed.current()
    return DataParallel(world) if world.size > 1 else Local()
