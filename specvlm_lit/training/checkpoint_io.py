"""Lightning checkpoints that land atomically where they are written, whatever filesystem TMPDIR is on.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction: the bytes go to a temporary file in
TMPDIR, which is then *moved* onto the destination. When TMPDIR is another filesystem (a tmpfs ``/tmp``, a node-local
scratch disk) that move is a copy, so a kill or a full disk in the middle of it leaves a truncated ``last.ckpt``
that does not load, and every kill leaves a partial file in TMPDIR. :class:`AtomicCheckpointIO` writes the checkpoint
into a hidden temporary file in the destination's own directory, fsyncs it and renames it over the destination:
readers (and a resume) see the previous checkpoint or the complete new one, never part of one.
"""

from __future__ import annotations

from typing import Any

import fsspec
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..utils.atomic import atomic_file

__all__ = ["AtomicCheckpointIO"]


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
