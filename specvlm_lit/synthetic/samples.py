"""Read samples back from synthetic (or any LLaVA-format, png-imaged) webdataset shards, in shard order."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import webdataset as wds
from PIL import Image


def iter_test_samples(urls, limit: int | None = None) -> Iterator[tuple[Image.Image, dict]]:
    """(RGB image, json record) per sample of ``urls``, in order, at most ``limit`` of them."""
    for i, s in enumerate(wds.WebDataset(urls, shardshuffle=False)):
        if limit is not None and i >= limit:
            return
        yield Image.open(io.BytesIO(s["png"])).convert("RGB"), json.loads(s["json"])
