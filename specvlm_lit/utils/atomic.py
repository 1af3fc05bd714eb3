"""Publish a directory all at once: readers see the old one, the complete new one, or none, never half of one.

Every project output directory (drafter exports, the synthetic corpus, built targets) is written through
:func:`atomic_directory`. Publishing *replaces* the target, so the publisher must never replace a directory the
project did not create: it writes a marker file (:data:`MARKER`, saying what wrote it) into everything it publishes
and replaces an existing target only when that target is empty or carries a marker of the same kind. Anything
else raises :class:`ForeignDirectoryError` before a byte is written, so a mistyped output path costs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..errors import UserError

__all__ = [
    "MARKER",
    "ForeignDirectoryError",
    "atomic_directory",
    "check_replaceable",
    "atomic_file",
    "fsync_path",
    "interrupted_writes",
    "marker_text",
]

#: File written into every published directory: ``{"written_by": "specvlm-lit", "kind": <kind>}``.
MARKER = ".specvlm-lit"
_WRITER = "specvlm-lit"


def marker_text(kind: str) -> str:
    """The :data:`MARKER` file's content for a directory of ``kind`` (for writers that fill a directory in place)."""
    return json.dumps({"written_by": _WRITER, "kind": kind}) + "\n"


class ForeignDirectoryError(UserError):
    """An output path names an existing directory (or file) that specvlm-lit did not create; it is left untouched."""


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def interrupted_writes(target: str | os.PathLike) -> list[Path]:
    """Temporary directories a killed writer left next to ``target`` (never published, incomplete)."""
    target = Path(target).expanduser().absolute()
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(_temp_prefix(target) + "*"))


def _marker_kind(directory: Path) -> str | None:
    try:
        info = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("written_by") != _WRITER:
        return None
    return info.get("kind")


def check_replaceable(
    target: str | os.PathLike, kind: str, *, published_before: Callable[[Path], bool] | None = None
) -> None:
    """Raise :class:`ForeignDirectoryError` unless publishing a ``kind`` directory at ``target`` is safe.

    Safe means: ``target`` does not exist, is an empty directory, or carries the marker of a ``kind`` directory.
    ``published_before(target)`` recognises ``kind`` directories written by versions that did not write markers yet
    (e.g. a drafter export's ``config.json``), so they can still be replaced. Callers may call this up front to fail
    before long work whose result would be published there; :func:`atomic_directory` checks again itself.
    """
    target = Path(target).expanduser().absolute()
    fix = "Choose an empty or new directory, or remove it yourself."
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise ForeignDirectoryError(f"{target} exists and is not a directory; refusing to replace it. {fix}")
    found = _marker_kind(target)
    if found == kind or (found is None and published_before is not None and published_before(target)):
        return
    if found is not None:
        raise ForeignDirectoryError(
            f"{target} holds a specvlm-lit {found}, not a {kind}; refusing to replace it with a {kind}. {fix}"
        )
    if any(target.iterdir()):
        raise ForeignDirectoryError(
            f"{target} exists, is not empty and was not written by specvlm-lit (no {MARKER} file); refusing to "
            f"replace it with a {kind}. {fix}"
        )


def fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` so that a power loss after the rename cannot publish holes."""
    for p in sorted(root.rglob("*")):
        if p.is_file() or p.is_dir():
            fsync_path(p)
    fsync_path(root)


@contextmanager
def atomic_directory(
    target: str | os.PathLike, kind: str, *, published_before: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Yield an empty temporary directory to write ``target``'s contents into; on success publish it as ``target``.

    ``kind`` names what is published (``"drafter"``, ``"corpus"``, ...): it goes into the :data:`MARKER` file and an
    existing ``target`` is replaced only if :func:`check_replaceable` allows it (checked before the body runs and
    again before publishing). The temporary directory lives next to ``target`` (same filesystem, so the renames are
    atomic); its files are fsynced before publishing. An existing ``target`` is first renamed aside and deleted only
    once the new one is in place, so a crash between the two renames leaves the previous directory in a hidden
    ``.<name>.old-*`` directory, never a half-written ``target``. On any exception (KeyboardInterrupt included)
    the temporary directory is removed and ``target`` is left as it was; a killed process leaves at most a hidden
    ``.<name>.tmp-*`` directory (:func:`interrupted_writes`), never a ``target`` that looks complete.
    """
    target = Path(target).expanduser().absolute()
    check_replaceable(target, kind, published_before=published_before)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=parent))
    aside: Path | None = None  # holds the previous target while the new one is renamed into place
    published = False
    try:
        yield tmp
        (tmp / MARKER).write_text(marker_text(kind), encoding="utf-8")
        _fsync_tree(tmp)
        check_replaceable(target, kind, published_before=published_before)
        if os.path.lexists(target):
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.rename(target, aside / "previous")
        os.rename(tmp, target)
        published = True
        fsync_path(parent)
    except BaseException:
        if published:  # interrupted after the new directory went in: the previous one is no longer needed
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            previous = aside / "previous"
            if os.path.lexists(previous) and not os.path.lexists(target):
                os.rename(previous, target)  # put the previous directory back
            if not os.path.lexists(previous):
                aside.rmdir()
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _default_file_mode() -> int:
    """What ``open(..., "w")`` would create (0o666 less the umask); mkstemp's own 0o600 would hide checkpoints."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file to write ``target``'s new content into; on success it replaces ``target`` in one rename.

    The file is a hidden ``.<name>.tmp-*`` next to ``target`` (same filesystem, so the rename is atomic), flushed
    to disk before the rename, and the directory entry after it. On any exception (KeyboardInterrupt included) the
    temporary file is removed and ``target`` is left as it was. A killed process can leave the temporary file
    behind; the next successful write of the same ``target`` removes such leftovers.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _default_file_mode())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)
    for leftover in interrupted_writes(target):  # the hidden names atomic_directory uses too
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
