"""Publish a directory all at once: readers see the old one, the complete new one, or none."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | Path, label: str = "dir"):
    """Yield a temporary directory next to ``target``; on success it replaces ``target`` by a rename.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and ``target`` is
    left untouched, so an interrupted writer never leaves a half-written directory that looks complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{label}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
