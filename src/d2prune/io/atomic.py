"""Atomic writes: write into a temp sibling, fsync it, rename it into place, fsync the folder.

Readers see either the old file (or folder) or the complete new one, never a torn one, and after a
crash the rename is not on disk ahead of the data it publishes. d2prune's writers go through these
helpers:

- ``write_bytes_atomic(path, data)``, ``write_text_atomic(path, text)``, ``write_json_atomic(path, obj)``
- ``atomic_path(path)``: a context manager yielding a temp file name, for writers that want a file
  name (safetensors' ``save_file``, ``torch.save``, ``Figure.savefig``)
- ``atomic_folder(out_dir)``: a context manager yielding a temp folder (``save_pretrained`` and the
  like), which is fsynced and renamed into place whole; it tidies up after earlier, killed saves
- ``publish_folder(tmp, out_dir)``: the same fsync and rename for a temp folder filled over time

Temp names are ``.{name}.tmp-<pid>`` next to the target (a rename is only atomic within one file
system), so a leftover names the process that made it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from d2prune.errors import UserError

# Write failures that are the machine's state, not a bug: a full disk or quota, a read-only or
# forbidden target. They become a one-line UserError (after the temp file or folder is removed).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _as_user_error(exc: BaseException, target: Path) -> BaseException:
    """``exc`` as the UserError to raise instead when it is a write failure of ``_WRITE_ERRNOS``."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        reason = exc.strerror or os.strerror(exc.errno)
        return UserError(f"could not write {target}: {reason}; nothing was saved there")
    return exc


def _temp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename, a new file) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows, some network file systems: nothing more we can do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder bottom up (``folder`` itself last)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(root)


# --------------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp file name next to ``path``; once the block succeeds, fsync it, give it ``mode``
    (if set), rename it to ``path`` and fsync the folder. If the block raises, the temp file is
    removed and ``path`` is left as it was. The parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        fsync_file(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        mapped = _as_user_error(exc, path)
        if mapped is exc:
            raise
        raise mapped from None
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`). Returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically. Returns ``path``."""
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(
    path: str | os.PathLike, obj: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = str
) -> Path:
    """Write ``obj`` as JSON plus a newline to ``path`` atomically, so a crash never leaves a partial
    record. Values JSON cannot hold go through ``default`` (``str`` unless told otherwise)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def write_synced(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) in place and fsync it: for a file inside a temp folder that a later
    rename publishes, which must not outrun the data."""
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        mapped = _as_user_error(exc, Path(path))
        if mapped is exc:
            raise
        raise mapped from None


# --------------------------------------------------------------------------------------------------
# Folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(out_dir: Path) -> None:
    """Tidy up after earlier, killed saves to the same target (only those of dead processes).

    A half-written ``.{name}.tmp-<pid>`` is deleted. A ``.{name}.old-<pid>`` is a complete earlier
    result that was moved aside: it is put back if nothing replaced it, else deleted.
    """
    parent, name = out_dir.parent, out_dir.name
    for kind in ("tmp", "old"):
        for p in sorted(parent.glob(f".{name}.{kind}-*")):
            pid = p.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
                continue
            if kind == "old" and not out_dir.exists():
                try:
                    os.rename(p, out_dir)
                    continue
                except OSError:
                    pass
            shutil.rmtree(p, ignore_errors=True)


def move_into_place(tmp: Path, out_dir: Path, replace: bool = True) -> None:
    """Rename the complete folder ``tmp`` to ``out_dir``; an existing non-empty ``out_dir`` is only
    moved aside (``.{name}.old-<pid>``) once the new one is complete, then deleted. With
    ``replace=False`` an existing non-empty ``out_dir`` wins and ``tmp`` is deleted."""
    old = _temp_sibling(out_dir, "old")
    if out_dir.exists():
        if any(out_dir.iterdir()) and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
        elif any(out_dir.iterdir()):
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            out_dir.rmdir()
            os.rename(tmp, out_dir)
    else:
        os.rename(tmp, out_dir)


def publish_folder(tmp: Path, out_dir: Path, replace: bool = True) -> None:
    """fsync everything in the complete folder ``tmp``, rename it to ``out_dir`` (see
    :func:`move_into_place`), fsync the parent: for a temp folder filled over a longer time (a
    resumable streamed save) rather than inside :func:`atomic_folder`."""
    fsync_tree(tmp)
    move_into_place(tmp, out_dir, replace)
    fsync_dir(out_dir.parent)


def prepare_folder_target(out_dir: str | os.PathLike) -> Path:
    """The absolute ``out_dir``, after tidying up leftovers of killed saves to it
    (:func:`clean_stale_temps`); a UserError if it exists and is not a folder.

    :func:`atomic_folder` does this itself; a caller that may fail before it starts writing (a bad
    record) calls it first, so that the tidying happens anyway."""
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a folder")
    if out_dir.parent.is_dir():
        clean_stale_temps(out_dir)
    return out_dir


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder next to ``out_dir``; once the block succeeds, fsync everything in
    it, rename it to ``out_dir`` (see :func:`move_into_place` for ``replace``) and fsync the parent.
    If the block raises, the temp folder is deleted and ``out_dir`` is left as it was.

    Before that, leftovers of killed saves to the same target are tidied (:func:`prepare_folder_target`)
    and the parent folder is created. A file at ``out_dir``, or a parent that cannot be created, is a
    UserError.
    """
    out_dir = prepare_folder_target(out_dir)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {parent}: {exc}") from None
    tmp = _temp_sibling(out_dir)
    try:
        tmp.mkdir()
        yield tmp
        publish_folder(tmp, out_dir, replace)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        mapped = _as_user_error(exc, out_dir)
        if mapped is exc:
            raise
        raise mapped from None
