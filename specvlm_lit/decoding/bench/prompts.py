"""The user's own prompts (``bench.prompts``), read and checked before any model work.

Two inputs:

* a JSONL file, one ``{"image": <path>, "prompt": <text>, "category": <text, optional>}`` per line; the image path
  is absolute or relative to the JSONL file's directory; other fields (an ``id``, a reference answer) are allowed
  and ignored, except ``id`` which names the sample in ``bench.json``;
* webdataset shards in this project's format (``<key>.json`` with LLaVA ``conversations`` and its image members,
  :func:`~specvlm_lit.data.shards.image_members`): a directory of ``*.tar``, a brace pattern, a glob or one
  ``.tar``. The prompt is the first human turn; the category the record's ``category`` or ``tasks[0]``
  (:func:`~.samples.task_of`).

Every image is decoded at its own size: a user prompt's ``resolution`` is its image's longest side. Each broken
line or sample is a one-line :class:`~specvlm_lit.decoding.pipeline.DecodeInputError` naming the line (JSONL) or
the sample key and shard; shard samples without an image (text-only: nothing for a VLM bench to decode) or with
several (the decoder takes one image per request) are left out and counted in ``skipped`` by reason.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline import DecodeInputError, check_prompt, load_image
from .samples import Sample, task_of

__all__ = ["UserPrompts", "is_shard_source", "read_user_prompts"]

EXAMPLE_LINE = '{"image": "images/cat.png", "prompt": "What is in the image?", "category": "captioning"}'
NO_IMAGE = "no_image"  # the skip reason of a text-only shard sample
MULTI_IMAGE = "multi_image"  # the skip reason of a shard sample with several images (one image per request)


@dataclass
class UserPrompts:
    sources: list[str]  # the JSONL file, or the shards, as read
    samples: list[Sample]
    skipped: dict[str, int] = field(default_factory=dict)  # shard samples left out, by reason


def is_shard_source(spec: str) -> bool:
    """Whether ``bench.prompts`` names webdataset shards (a directory, brace pattern, glob, ``.tar`` or URL)
    rather than a JSONL file."""
    from ...data.sources import is_remote, local_path

    return is_remote(spec) or any(c in spec for c in "{*?[") or spec.endswith(".tar") or local_path(spec).is_dir()


def read_user_prompts(spec: str, limit: int | None = None) -> UserPrompts:
    """The samples ``bench.prompts=spec`` names, at most ``limit`` of them (the first ones, in file order)."""
    if is_shard_source(spec):
        return _read_shards(spec, limit)
    return _read_jsonl(Path(spec).expanduser(), limit)


# ------------------------------------------------------------------------------------------------ JSONL
def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` per non-blank line, in order; a line that is not a JSON object raises naming it."""
    if not path.exists():
        raise DecodeInputError(
            f"bench.prompts: {path} does not exist; give a JSONL file with one {EXAMPLE_LINE} per line, or a "
            "directory / brace pattern of webdataset shards"
        )
    if not path.is_file():
        raise DecodeInputError(f"bench.prompts: {path} is not a file")
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeInputError(f"bench.prompts {path} line {n} is not UTF-8 text ({e.reason})") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DecodeInputError(
                f"bench.prompts {path} line {n} is not valid JSON ({e.msg} at column {e.colno}); each line must be "
                f"one object such as {EXAMPLE_LINE}"
            ) from None
        if not isinstance(rec, dict):
            raise DecodeInputError(
                f"bench.prompts {path} line {n} holds a JSON {type(rec).__name__}, not an object such as "
                f"{EXAMPLE_LINE} (JSONL: one object per line)"
            )
        yield n, rec


def _checked_line(path: Path, n: int, rec: dict) -> tuple[Path, str, str]:
    """``(image path, prompt, category)`` of JSONL line ``n``; the image must exist (it is decoded later)."""
    where = f"bench.prompts {path} line {n}"
    missing = [k for k in ("image", "prompt") if k not in rec]
    if missing:
        raise DecodeInputError(f"{where} has no {' / '.join(repr(k) for k in missing)} field; e.g. {EXAMPLE_LINE}")
    image, prompt, category = rec["image"], rec["prompt"], rec.get("category")
    if not isinstance(image, str) or not image.strip():
        raise DecodeInputError(f"{where}: 'image' must be a non-empty path, got {image!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DecodeInputError(f"{where}: the prompt is empty; give the question to ask about the image")
    if category is not None and (not isinstance(category, str) or not category.strip()):
        raise DecodeInputError(f"{where}: 'category' must be a non-empty string or absent, got {category!r}")
    try:
        check_prompt(prompt)
    except DecodeInputError as e:
        raise DecodeInputError(f"{where}: {e}") from None
    image_path = Path(image).expanduser()
    if not image_path.is_absolute():
        image_path = path.parent / image_path  # relative to the JSONL file, not to the working directory
    if not image_path.is_file():
        what = "is not a file" if image_path.exists() else "does not exist"
        raise DecodeInputError(
            f"{where}: image {image_path} {what} (relative paths are resolved against {path.parent})"
        )
    return image_path, prompt, task_of(rec)


def _read_jsonl(path: Path, limit: int | None) -> UserPrompts:
    # Every line is checked (cheap: parse + stat) so a broken line past `limit` is found now, not on the full run;
    # only the images of the lines used are decoded.
    lines = [(n, rec, _checked_line(path, n, rec)) for n, rec in _jsonl_records(path)]  # in line order
    if not lines:
        raise DecodeInputError(f"bench.prompts {path} holds no prompts; write one {EXAMPLE_LINE} per line")
    samples = []
    for n, rec, (image_path, prompt, category) in lines[:limit]:
        try:
            img = load_image(image_path)
        except DecodeInputError as e:
            raise DecodeInputError(f"bench.prompts {path} line {n}: {e}") from None
        samples.append(_sample(str(rec.get("id", f"line {n}")), category, prompt, img, f"{path.name} line {n}"))
    return UserPrompts([str(path)], samples)


# ----------------------------------------------------------------------------------------------- shards
def _shard_urls(spec: str) -> list[str]:
    from ...data.sources import ShardPathError, check_shards, local_path

    directory = local_path(spec)
    if directory.is_dir():
        tars = sorted(str(p) for p in directory.glob("*.tar"))
        if not tars:
            held = sorted(p.name for p in directory.iterdir())[:5]
            raise DecodeInputError(
                f"bench.prompts={spec!r} is a directory without webdataset shards (*.tar)"
                + (f"; it holds {', '.join(held)}" if held else "; it is empty")
                + ". Give a JSONL file or the shards"
            )
        return tars
    try:
        return check_shards(spec, "bench.prompts")
    except ShardPathError as e:
        raise DecodeInputError(str(e)) from None


def _first_question(rec, where: str) -> str:
    """The first human turn of a LLaVA record (the question the bench asks)."""
    from ...data.conversation import ConversationError, normalise

    if not isinstance(rec, dict) or "conversations" not in rec:
        raise DecodeInputError(f"{where}: the .json is not a record with LLaVA 'conversations'")
    try:
        question = normalise(rec["conversations"])[0][1]
    except ConversationError as e:
        raise DecodeInputError(f"{where}: {e}") from None
    if not question.strip():
        raise DecodeInputError(f"{where}: the first human turn (the prompt) is empty")
    return question


def _read_shards(spec: str, limit: int | None) -> UserPrompts:
    import webdataset as wds
    from PIL import Image

    from ...data.shards import SampleSkip, image_members

    urls = _shard_urls(spec)
    samples: list[Sample] = []
    skipped: Counter = Counter()
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if limit is not None and len(samples) >= limit:
            break
        key, url = s.get("__key__", "?"), s.get("__url__", "?")
        where = f"bench.prompts: sample {key} of {url}"
        if "json" not in s:
            raise DecodeInputError(f"{where} has no .json member (members: {sorted(k for k in s if k[0] != '_')})")
        try:
            rec = json.loads(s["json"])
        except ValueError as e:
            raise DecodeInputError(f"{where}: its .json is not valid JSON ({e})") from None
        question = _first_question(rec, where)
        try:
            members = image_members(s, rec)
        except SampleSkip as e:
            if "images" in rec:  # the converter's layout names its members: one is missing
                raise DecodeInputError(f"{where}: {e}") from None
            members = []  # the one-image layout without an image member: a text-only sample
        if len(members) != 1:
            # Text-only samples have nothing for a VLM bench to decode; the decoder takes one image per request.
            skipped[NO_IMAGE if not members else MULTI_IMAGE] += 1  # counted in the report, not decoded
            continue
        image_bytes = members[0][1]
        try:
            img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DecodeInputError(f"{where}: its image cannot be decoded ({' '.join(str(e).split())})") from None
        samples.append(_sample(str(rec.get("id", key)), task_of(rec), question, img, f"{Path(url).name} {key}"))
    if not samples:
        why = f" ({', '.join(f'{n} {reason}' for reason, n in skipped.items())} sample(s) left out)" if skipped else ""
        raise DecodeInputError(f"bench.prompts={spec!r}: the shards hold no sample with an image{why}")
    return UserPrompts(urls, samples, dict(skipped))


def _sample(sample_id: str, category: str, prompt: str, img, source: str) -> Sample:
    return Sample(sample_id, category, prompt, img, max(img.size), tuple(img.size), False, source)
