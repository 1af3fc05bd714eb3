"""Shard URLs -> the list of shards, checked before any model loads.

``data.train_urls`` / ``data.val_urls`` take a path, a list of paths, ``::``-separated paths, brace patterns
(``train-{000000..000011}.tar``) and, for local paths, globs (``/data/llava/train-*.tar``); ``~`` is expanded.
Every local shard must exist, so a mistyped or unexpanded path is a one-line error naming the field, the pattern
and what exists nearby, instead of a stream that warns and never ends. Remote and ``pipe:`` URLs are left to
webdataset (they are read, and counted when unreadable, at run time).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from webdataset.shardlists import expand_urls

from ..errors import UserError

_REMOTE = re.compile(r"^(?!file:)[a-zA-Z][a-zA-Z0-9+.-]+:")  # http:, https:, s3:, gs:, pipe:, ... (not C:\)
_GLOB = re.compile(r"[*?\[]")


class ShardPathError(UserError):
    """``data.train_urls`` / ``data.val_urls`` names no shard, or shards that do not exist."""


def is_remote(url: str) -> bool:
    return bool(_REMOTE.match(url))


def local_path(url: str) -> Path:
    return Path(os.path.expanduser(re.sub(r"^file:(//)?", "", url)))


def expand_shards(urls, field: str = "the shard pattern") -> list[str]:
    """All shards ``urls`` names, in order: brace patterns and ``::`` lists expanded, local globs matched (sorted).

    Raises :class:`ShardPathError` for an unbalanced brace pattern; a glob matching nothing is kept as written
    (:func:`check_shards` reports it)."""
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls or [])
    out: list[str] = []
    for pattern in patterns:
        try:
            expanded = list(expand_urls(str(pattern)))
        except ValueError:  # braceexpand.UnbalancedBracesError
            raise ShardPathError(
                f"{field}: {pattern!r} has unbalanced braces; write e.g. train-{{000000..000011}}.tar"
            ) from None
        for url in expanded:
            if not url.strip():
                continue
            if not is_remote(url) and _GLOB.search(url):
                out += sorted(glob.glob(str(local_path(url)))) or [url]
            else:
                out.append(url if is_remote(url) else str(local_path(url)))
    return out


def _nearby(path: Path) -> str:
    """What exists where ``path`` was expected, for the error message."""
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if parent != path.parent:
        return f"{path.parent} does not exist (nearest existing directory: {parent})"
    tars = sorted(p.name for p in parent.iterdir() if p.name.endswith(".tar"))
    if not tars:
        others = sorted(p.name for p in parent.iterdir())
        listing = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        return f"{parent} holds no .tar file" + (f" (it holds {listing})" if others else " (it is empty)")
    shown = ", ".join(tars[:3]) + (f", ... {tars[-1]}" if len(tars) > 3 else "")
    return f"{parent} holds {len(tars)} .tar file(s): {shown}"


def check_shards(urls, field: str, *, pending: Path | None = None) -> list[str]:
    """The shards ``urls`` names, or a :class:`ShardPathError` naming ``field`` if any local one is missing.

    Shards under ``pending`` (a corpus directory about to be generated) need not exist yet."""
    shards = expand_shards(urls, field)
    if not shards:
        raise ShardPathError(
            f"{field} is empty: give the shard files, e.g. {field}='/data/train-{{000000..000011}}.tar'"
        )
    local = [local_path(s) for s in shards if not is_remote(s)]
    for p in local:
        if p.is_dir():
            raise ShardPathError(
                f"{field}={urls!r} names the directory {p}; give the shard files in it, e.g. "
                f"{field}='{p}/train-{{000000..000011}}.tar' or '{p}/*.tar' ({_nearby(p / 'x')})"
            )
    missing = [p for p in local if not p.is_file() and not (pending is not None and p.is_relative_to(pending))]
    if missing:
        hint = " (the path holds an unexpanded '$' variable)" if "$" in str(urls) else ""
        raise ShardPathError(
            f"{field}={urls!r}: {len(missing)} of {len(shards)} shard(s) do not exist, e.g. {missing[0]}{hint}; "
            f"{_nearby(missing[0])}"
        )
    return shards
