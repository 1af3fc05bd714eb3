"""The held-out test samples a benchmark decodes: shard discovery (globs, first-use corpus generation) and the
per-resolution selection."""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..pipeline import DecodeInputError
from .settings import BenchSettings

__all__ = ["Sample", "collect_samples", "expand_urls", "resolve_test_urls", "task_of"]


@dataclass
class Sample:
    id: str
    task: str
    question: str
    image: Any  # PIL image at `resolution`
    resolution: int
    native_size: tuple[int, int]
    resized: bool
    source: str = ""  # where a user prompt came from (``prompts.jsonl line 3``), named in its errors


def expand_urls(urls: Sequence[str]) -> list[str]:
    """Glob patterns are expanded (sorted); other strings (e.g. webdataset brace ranges) are kept as they are."""
    out = []
    for u in urls:
        if any(c in u for c in "*?["):
            out += sorted(glob.glob(os.path.expanduser(u)))
        else:
            out.append(u)
    return out


def _exists(u: str) -> bool:
    return "{" in u or "://" in u or Path(u).expanduser().is_file()


def resolve_test_urls(s: BenchSettings, log=print) -> list[str]:
    urls = [u for u in expand_urls(s.test_urls) if _exists(u)]
    if not urls and s.corpus_dir:
        from ...synthetic.generate import CorpusSpec, ensure_corpus

        log(f"no test shards match {s.test_urls}; generating the synthetic corpus into {s.corpus_dir} (first use)")
        ensure_corpus(s.corpus_dir, CorpusSpec(), log=log)
        urls = [u for u in expand_urls(s.test_urls) if _exists(u)]
    if not urls:
        raise DecodeInputError(f"no test shards found at {s.test_urls}; set bench.test_urls=<held-out shards>")
    return urls


def task_of(rec: dict) -> str:
    """What a record's results are grouped by (``per_task``): its ``category`` when it has one (a user prompt, or a
    converted sample), else its first turn's task type (the one the benchmark asks), ``"unknown"`` if untagged."""
    category = rec.get("category")
    return str(category) if category else str((rec.get("tasks") or ["unknown"])[0])


def collect_samples(
    urls: Sequence[str], resolutions: Sequence[int], n: int, tasks: Sequence[str] | None = None
) -> list[Sample]:
    """``n`` held-out samples per resolution: the first samples whose image natively has that size, topped up (if
    the split has too few) with the next samples resized to it (bicubic; marked ``resized``). ``tasks``: keep only
    samples of these task types (``None`` = all), e.g. ``["describe"]`` for long answers."""
    from PIL import Image

    from ...synthetic.samples import iter_test_samples

    native: dict[int, list] = {r: [] for r in resolutions}
    pool: list = []
    seen: Counter = Counter()
    for img, rec in iter_test_samples(list(urls)):
        seen[task_of(rec)] += 1
        if tasks is not None and task_of(rec) not in tasks:
            continue
        w, h = img.size
        entry = (img, rec)
        if w == h and w in native and len(native[w]) < n:
            native[w].append(entry)
        else:
            pool.append(entry)
        if all(len(v) >= n for v in native.values()):
            break
    samples = []
    for r in resolutions:
        chosen = [(img, rec, False, img.size) for img, rec in native[r]]
        for img, rec in pool:
            if len(chosen) >= n:
                break
            chosen.append((img.resize((r, r), Image.BICUBIC), rec, True, img.size))
        if len(chosen) < n:
            which = "" if tasks is None else f" of task(s) {list(tasks)} (the split has {dict(sorted(seen.items()))})"
            raise DecodeInputError(
                f"the test split holds only {len(chosen)} samples{which}; lower bench.samples_per_resolution "
                f"(asked {n})" + ("" if tasks is None else " or change bench.tasks")
            )
        for img, rec, resized, size in chosen:
            samples.append(
                Sample(
                    str(rec.get("id", len(samples))),
                    task_of(rec),
                    rec["conversations"][0]["value"],
                    img,
                    r,
                    tuple(size),
                    resized,
                )
            )
    return samples
