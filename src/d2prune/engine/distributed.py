"""Data-parallel calibration on ``torch.distributed``: several processes prune one model together.

Launched with ``torchrun`` (NCCL on GPUs, gloo on CPUs), every rank loads the model and the whole
calibration set, and then:

* runs only its share of the calibration batches (whole batches, contiguous: ``World.shard``)
  through each layer, so it holds only those activations;
* after each layer's statistics pass sums the statistics over ranks (``executor.reduce_statistics``: the
  shared Grams and each pruner's ``Statistic`` tensors with their counts, each reduced to the rank
  that prunes the linears reading it; also OWL's norms, the Pruner-Zero gradient sums and perplexity
  NLLs, all-reduced), so the rank that prunes a linear holds the one-process statistics up to
  floating-point reassociation;
* prunes only the linears assigned to it (``executor.assign``: largest work first, each to the least loaded
  rank) and broadcasts the pruned weights (``executor.share_pruned``), so every rank runs the same pruned layer.

Streamed from disk (``streaming.prune_checkpoint``, ``--offload disk``): every rank reads each layer
from the checkpoint and keeps its activation files apart (``World.file_rank``); rank 0 alone writes
the output shards, the progress record and the finished folder. ``--resume`` runs in one process only.

Errors: local work between collectives runs inside ``World.sync``, whose end exchanges an error flag,
so an exception on one rank is raised on every rank (a ``UserError`` as the same one-line error). A
rank that dies or hangs is caught by the process-group timeout (or a closed connection): the others
raise ``PeerError``. With NCCL, tensor collectives are watched by NCCL's own watchdog, which aborts
the process after the timeout; flags and objects always go through a gloo group.
A rank leaves with ``shutdown`` (after waiting for the others) after a normal return, and with
``exit_after_failure`` (no teardown) after a failure.

With one process (no ``WORLD_SIZE`` > 1, no process group) nothing here touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from d2prune.errors import UserError

DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "D2PRUNE_DIST_TIMEOUT"
# Tensors up to this many elements are summed in one flat buffer per dtype (one collective).
_COALESCE_NUMEL = 1 << 20


class PeerError(RuntimeError):
    """Another rank failed, exited or stopped answering (raised on the ranks that did not fail)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; ``World()`` is a single process."""

    rank: int = 0
    size: int = 1
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    control: Any = field(default=None, repr=False, compare=False)  # gloo group for flags and objects

    @property
    def device(self) -> torch.device:
        """Where tensors must be for the backend's collectives."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def file_rank(self) -> int | None:
        """What names this rank's own files next to the other ranks' (activation buffers): the rank
        with several ranks, None on one process (whose file names carry no rank)."""
        return self.rank if self.size > 1 else None

    # -- sharding ------------------------------------------------------------------------------

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of ``n`` items (sizes differ by at most one)."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def shard(self, items: list, what: str = "calibration batches", allow_empty: bool = False) -> tuple[list, int]:
        """This rank's share of ``items`` and the index of its first item."""
        if self.size > 1 and len(items) < self.size and not allow_empty:
            raise UserError(
                f"{len(items)} {what} cannot be shared by {self.size} ranks: use at least {self.size} "
                "calibration windows (--nsamples) per --batch-size, or fewer ranks"
            )
        lo, hi = self.bounds(len(items))
        return items[lo:hi], lo

    # -- errors --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def sync(self, what: str) -> Iterator[None]:
        """Run local work (no collectives inside); if it raised on any rank, raise on every rank."""
        if self.size == 1:
            yield
            return
        failure: Exception | None = None
        try:
            yield
        except Exception as exc:  # KeyboardInterrupt is left alone: torchrun stops every rank
            failure = exc
        self._agree(failure, what)

    def barrier(self, what: str) -> None:
        """Wait until every rank got here (e.g. before rank 0 acts on files the others wrote)."""
        if self.size > 1:
            self._agree(None, what)

    def _agree(self, failure: Exception | None, what: str) -> None:
        import torch.distributed as dist

        flags = torch.zeros(self.size, dtype=torch.int64)
        if failure is not None:
            flags[self.rank] = 2 if isinstance(failure, UserError) else 1
        with self._collective(f"checking the ranks after {what}"):
            dist.all_reduce(flags, group=self.control)
        failed = [r for r in range(self.size) if flags[r]]
        if not failed:
            return
        first = failed[0]
        mine = (
            None
            if failure is None
            else (str(failure) if flags[self.rank] == 2 else f"{type(failure).__name__}: {failure}")
        )
        message = [mine if self.rank == first else None]
        with self._collective(f"sharing rank {first}'s error"):
            dist.broadcast_object_list(message, src=first, group=self.control)
        if flags[first] == 2 and (failure is None or isinstance(failure, UserError)):
            # Every rank prints the same one-line error.
            raise UserError(f"rank {first}: {message[0]}") from failure
        if failure is not None:
            raise failure
        raise PeerError(f"rank {first} failed while {what}: {message[0]}")

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Turn a timed-out or broken collective into a one-line PeerError."""
        try:
            yield
        except PeerError:
            raise
        except RuntimeError as exc:  # DistBackendError, gloo timeouts, closed connections
            detail = _first_line(exc)
            raise PeerError(
                f"{what}: another rank did not answer within {self.timeout_s:g} s or exited ({detail}); "
                "see that rank's output"
            ) from exc

    # -- collectives ---------------------------------------------------------------------------

    def all_reduce_sum(self, tensors: list[torch.Tensor], what: str) -> None:
        """Sum every tensor over ranks, in place; every rank must pass the same shapes in the same order."""
        self._sum(tensors, None, what)

    def reduce_sum(self, tensors: list[torch.Tensor], dst: int, what: str) -> None:
        """Sum every tensor over ranks into rank ``dst``'s tensors, in place (the other ranks' tensors
        are left undefined); every rank must pass the same shapes in the same order."""
        self._sum(tensors, dst, what)

    def _sum(self, tensors: list[torch.Tensor], dst: int | None, what: str) -> None:
        """All-reduce (``dst`` None) or reduce to ``dst``; small tensors travel coalesced per dtype."""
        if self.size == 1 or not tensors:
            return
        import torch.distributed as dist

        def collective(buf: torch.Tensor) -> None:
            if dst is None:
                dist.all_reduce(buf)
            else:
                dist.reduce(buf, dst)

        keep = dst is None or dst == self.rank
        small: dict[torch.dtype, list[torch.Tensor]] = {}
        with self._collective(what):
            for t in tensors:
                if t.numel() <= _COALESCE_NUMEL:
                    small.setdefault(t.dtype, []).append(t)
                else:
                    buf = self._staged(t)
                    collective(buf)
                    if buf is not t and keep:
                        t.copy_(buf)
            for group in small.values():
                flat = torch.cat([t.reshape(-1).to(self.device) for t in group])
                collective(flat)
                if not keep:
                    continue
                start = 0
                for t in group:
                    t.copy_(flat[start : start + t.numel()].view(t.shape))
                    start += t.numel()

    def broadcast_(self, tensor: torch.Tensor, src: int, what: str) -> None:
        """Overwrite ``tensor`` on every rank with rank ``src``'s."""
        if self.size == 1:
            return
        import torch.distributed as dist

        buf = self._staged(tensor)
        with self._collective(what):
            dist.broadcast(buf, src)
        if buf is not tensor:
            tensor.copy_(buf)

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself if the backend can use it in place, else a contiguous copy on its device."""
        if t.device == self.device and t.is_contiguous():
            return t
        return t.to(self.device).contiguous()

    def all_true(self, flag: bool, what: str) -> bool:
        """True on every rank iff ``flag`` is true on every rank."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(bool(flag))], dtype=torch.int64)
        with self._collective(what):
            dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.control)
        return bool(value.item())

    def all_gathered(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        with self._collective(what):
            dist.all_gather_object(out, obj, group=self.control)
        return out

    def check_same(self, signature: Any, what: str) -> None:
        """Raise on every rank if ranks hold different ``signature``s (e.g. statistics shapes): a
        mismatch would otherwise hang or mix unrelated tensors."""
        if self.size == 1:
            return
        import torch.distributed as dist

        digest = int(hashlib.sha256(repr(signature).encode()).hexdigest()[:15], 16)
        digests = torch.zeros(self.size, dtype=torch.int64)
        digests[self.rank] = digest
        with self._collective(what):
            dist.all_reduce(digests, group=self.control)
        if len(set(digests.tolist())) > 1:
            raise UserError(
                f"the ranks disagree on {what}: every rank must prune the same model with the same "
                "settings and calibration data"
            )


def _first_line(exc: BaseException) -> str:
    """An exception's first line, without gloo's ``[path/file.cc:123]`` prefix, at most 160 characters."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)
    return line if len(line) <= 160 else line[:157] + "..."


_current: World | None = None
_current_group: Any = None  # the default process group ``_current`` was made for


def current() -> World:
    """The running world: the default process group when one with several ranks is initialized
    (by ``init_from_env`` or the caller's own ``torch.distributed.init_process_group``), else one process."""
    global _current, _current_group
    try:
        import torch.distributed as dist
    except ImportError:  # a torch build without distributed support
        return World()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return World()
    if _current is None or _current_group is not dist.group.WORLD:  # first call, or a new process group
        backend = str(dist.get_backend())
        timeout_s = _timeout_from_env(None)
        # Flags and objects go through gloo, whose waits honour the timeout (NCCL's abort the process).
        control = (
            None if backend == "gloo" else dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        )
        _current = World(dist.get_rank(), dist.get_world_size(), backend, timeout_s, control)
        _current_group = dist.group.WORLD
    return _current


def _timeout_from_env(timeout_s: float | None) -> float:
    if timeout_s is not None:
        value: Any = timeout_s
    else:
        value = os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if not value > 0:
        raise UserError(f"the collective timeout must be positive, got {value:g} s")
    return value


def init_from_env(device: str = "cpu", timeout_s: float | None = None) -> tuple[World, str]:
    """Join the ranks that ``torchrun`` started (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); returns the world and this rank's compute device.

    NCCL for a CUDA ``device`` (rank r uses cuda:LOCAL_RANK), gloo otherwise. ``timeout_s`` (default:
    env D2PRUNE_DIST_TIMEOUT, else 1800 s) bounds every wait on another rank. Without WORLD_SIZE > 1
    this returns a single process and ``device`` unchanged.
    """
    global _current
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size < 2:
        return World(), device
    timeout_s = _timeout_from_env(timeout_s)
    os.environ[TIMEOUT_ENV] = f"{timeout_s:g}"  # so ``current()`` reports the same timeout
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={size} but {', '.join(missing)} unset: launch the ranks with torchrun")
    dev = torch.device(device)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise UserError(
                f"with several ranks per machine pass --device cuda (rank r uses cuda:LOCAL_RANK), not {device}"
            )
        dev = torch.device("cuda", dev.index if dev.index is not None else local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise PeerError(f"could not join the other ranks within {timeout_s:g} s ({_first_line(exc)})") from exc
    _current = None
    return current(), str(dev)


def shutdown() -> None:
    """Leave the process group after a normal return; a no-op on one process.

    Every rank first waits for the others (at most the group's timeout), so that no rank tears down
    its connections while a peer still uses them: two gloo ranks that left unsynchronised aborted at
    exit ("terminate called without an active exception") in about 1 run in 15 here, after every
    output was written. After a failure a peer may be gone or hang: leave with ``exit_after_failure``."""
    global _current
    try:
        import torch.distributed as dist
    except ImportError:
        _current = None
        return
    try:
        current().barrier("the run")
    except RuntimeError:  # a PeerError too
        pass  # leaving anyway: the outputs are written and the peer reports its own failure
    _current = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_after_failure(code: int) -> NoReturn:
    """End this rank at once with exit status ``code`` after its run failed, without tearing down
    the process group or the interpreter.

    A peer that failed or hangs may still hold its connections to this rank; gloo's threads then
    abort the process during interpreter teardown ("terminate called without an active exception",
    exit -6, in 4 of about 165 runs of a rank whose peer stopped answering), after the error was
    printed, so the exit status would no longer say what happened. Output is flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
