"""Lightning checkpoints that land atomically where they are written, whatever filesystem TMPDIR is on.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction: the bytes go to a temporary file in
TMPDIR, which is then *moved* onto the destination. When TMPDIR is another filesystem (a tmpfs ``/tmp``, a node-local
scratch disk) that move is a copy, so a kill or a full disk in the middle of it leaves a truncated ``last.ckpt``
that does not load, and every kill leaves a partial file in TMPDIR. :class:`AtomicCheckpointIO` writes the checkpoint
into a hidden temporary file in the destination's own directory, fsyncs it and renames it over the destination:
readers (and a resume) see the previous checkpoint or the complete new one, never part of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..utils.atomic import _fsync_path, _temp_prefix, interrupted_writes

__all__ = ["AtomicCheckpointIO", "atomic_file"]


def _default_file_mode() -> int:
    """What ``open(..., "w")`` would create (0o666 less the umask); mkstemp's own 0o600 would hide checkpoints."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
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
    _fsync_path(target.parent)
    for leftover in interrupted_writes(target):  # the hidden names atomic_directory uses too
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through :func:`atomic_file`; remote URLs keep Lightning's path.

    Wired into every trainer by ``conf/trainer/default.yaml`` (``plugins``). Loading is Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or fsspec.utils.get_protocol(str(path)) != "file":
            # object stores publish whole objects already; storage_options: let Lightning refuse them as it does
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as f:
            torch.save(checkpoint, f)
