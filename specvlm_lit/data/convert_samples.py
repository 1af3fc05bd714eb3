"""One input record -> one shard sample, or the reason it cannot be one. Runs in the converter's worker processes.

A record (LLaVA ``conversations`` or OpenAI-style ``messages``) becomes LLaVA turns (``from``: ``human``/``gpt``,
the ``<image>`` placeholder where the image goes, as the project's chat template renders image parts) and a list of
image references, each a path (relative to ``--image-root``), a ``file://`` URL, a ``data:image/...;base64,`` URI
or embedded bytes. The sample written is ``<key>.json`` (``{"id", "images", "conversations"}``) + its image members
(``<key>.<ext>`` for one image, ``<key>.0.<ext>``, ``<key>.1.<ext>``, ... for several, none for a text-only record;
``images`` names them in placeholder order), each image's bytes kept as they are when the loader reads the format
(PNG, JPEG, WebP) and re-encoded as PNG otherwise (or always, as ``--image-format`` says). A LLaVA record's
``video`` (one path or a list, LLaVA-Video's field, relative to ``--image-root`` too) becomes ``<key>.v0.<ext>``,
``<key>.v1.<ext>``, ... members named by the json's ``videos`` list, in ``<video>`` placeholder order: the file's bytes
as they are (its frames are sampled at training time by the target's video processor). Every way a record can
fail is a :class:`Rejected` with a reason (:data:`REASONS`), never an exception: one odd record must not stop a
conversion.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .conversation import IMAGE_PLACEHOLDER, ROLE_ALIASES
from .convert_inputs import Malformed
from .members import VIDEO_KEYS

VIDEO_PLACEHOLDER = "<video>"  # LLaVA-Video's mark of a clip's place in a user turn

#: Why a record was not converted. The names shared with ``skips.SKIP_REASONS`` mean what they mean there.
REASONS = {
    "bad_json": "the record is not valid JSON or not a JSON object",
    "bad_conversation": "no conversation, a message that is not role + text, an unknown role, or <image> "
    "placeholders that do not match the images",
    "roles_out_of_order": "the turns do not alternate user, assistant, user, ... starting with the user",
    "no_answer": "the conversation has no assistant turn",
    "empty_answer": "an assistant turn is empty",
    "system_message_unsupported": "a system message (the LLaVA template has no place for it; --drop-system drops it)",
    "remote_image_unsupported": "the image is an http(s) or other remote URL (download the images first)",
    "missing_image": "the image file does not exist or the reference is not a path, URL or bytes",
    "corrupt_image": "the image cannot be decoded",
    "missing_video": "the video file does not exist or the reference is not a path",
    "corrupt_video": "the video file is empty, not a container the loader reads (mp4, webm, mkv, mov, avi), or its "
    "bytes are not that container's",
    "image_too_small": "an image is too small for the target's image processor (--target)",
    "too_long": "the encoded conversation is longer than --max-length tokens, images expanded (--target)",
}
#: ``--image-format``: keep loader-readable bytes, or re-encode every image.
IMAGE_FORMATS = ("source", "png", "jpg")
#: PIL format -> member extension the loader reads (``shards.IMAGE_KEYS``) when bytes are kept as they are.
_KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://", "ftp://")


@dataclass(frozen=True)
class Task:
    ordinal: int  # position over all inputs: the sample key, and the resume point
    source: str  # the input file's name, for rejects
    index: int  # position in that file
    schema: str  # llava | messages (convert_inputs.SCHEMA_FIELDS)
    record: object


@dataclass(frozen=True)
class Converted:
    ordinal: int
    key: str
    members: tuple[tuple[str, bytes], ...]  # (extension, bytes), json first


@dataclass(frozen=True)
class Rejected:
    ordinal: int
    source: str
    index: int
    id: str
    reason: str
    detail: str

    def entry(self) -> dict:
        """The rejects.jsonl line."""
        record = {"id": self.id, "source": self.source, "record": self.index}
        return record | {"reason": self.reason, "detail": self.detail}


class Reject(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ConvertOptions:
    """What every worker needs; plain values, so it pickles into worker processes."""

    image_root: str
    image_format: str = "source"
    drop_system: bool = False
    target: str | None = None  # a target directory: samples are encoded with its processor and length-checked
    max_length: int = 2048


def sample_key(ordinal: int) -> str:
    # No dots: webdataset splits a member name into key and extension at the first dot.
    return f"{ordinal:09d}"


# ---------------------------------------------------------------------------------------------------- records
def record_id(record: object, task: Task) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else f"{task.source}#{task.index}"


def _role(raw: object, i: int) -> str:
    """``user`` / ``assistant`` / ``system`` from a LLaVA ``from`` or a chat ``role``."""
    if isinstance(raw, str):
        if raw.lower() == "system":
            return "system"
        role = ROLE_ALIASES.get(raw.lower())
        if role is not None:
            return role
    raise Reject("bad_conversation", f"message {i} has role {raw!r}; expected human/gpt or user/assistant")


def _record_images(record: dict) -> list:
    """The record-level image list: LLaVA's ``image`` (one or a list) or a table's ``images`` column."""
    value = record.get("images", record.get("image"))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _conversation_field(record: dict, field: str) -> list:
    """The conversation list; some table exports store it as a JSON string."""
    value = record.get(field)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise Reject("bad_conversation", f"'{field}' is a string that is not JSON: {e}") from None
    if not isinstance(value, list):
        raise Reject("bad_conversation", f"'{field}' is {type(value).__name__}, not a list of messages")
    return value


def record_videos(record: dict) -> list:
    """A LLaVA record's videos: LLaVA-Video's ``video`` (one path or a list) or a ``videos`` list."""
    value = record.get("videos", record.get("video"))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def llava_turns(record: dict) -> tuple[list[tuple[str, str]], list]:
    conversations = _conversation_field(record, "conversations")
    turns = []
    for i, m in enumerate(conversations):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str):
            raise Reject("bad_conversation", f"message {i} is not a {{'from', 'value'}} object with text: {m!r:.80}")
        turns.append((_role(m.get("from"), i), m["value"]))
    return turns, _record_images(record)


def _part_image(part: dict, record_images: list, used: list[int], referenced: set[int]) -> object:
    """The image a content part names: its own reference, ``index`` into the record's images, or the next one."""
    if part.get("type") == "image_url":
        ref = part.get("image_url")
        return ref.get("url") if isinstance(ref, dict) else ref
    for field in ("image", "url", "path"):
        if part.get(field) is not None:
            return part[field]
    index = part.get("index")
    if index is None:
        index = used[0]
        used[0] += 1
    if not isinstance(index, int) or not 0 <= index < len(record_images):
        raise Reject("bad_conversation", f"an image part names image {index!r} of {len(record_images)}")
    referenced.add(index)
    return record_images[index]


def messages_turns(record: dict) -> tuple[list[tuple[str, str]], list]:
    """OpenAI-style messages -> turns; an image part becomes ``<image>\\n`` where it stands (the chat template's
    rendering), placeholders in string contents take the record's ``images`` in order."""
    messages = _conversation_field(record, "messages")
    record_images = _record_images(record)
    used = [0]  # next record image for parts and placeholders that do not name one
    referenced: set[int] = set()
    turns, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise Reject("bad_conversation", f"message {i} is not a {{'role', 'content'}} object: {m!r:.80}")
        role, content = _role(m.get("role"), i), m.get("content")
        if isinstance(content, str):
            n = content.count(IMAGE_PLACEHOLDER)
            images += record_images[used[0] : used[0] + n]
            referenced.update(range(used[0], min(used[0] + n, len(record_images))))
            used[0] += n
            turns.append((role, content))
            continue
        if not isinstance(content, list):
            raise Reject("bad_conversation", f"message {i} content is {type(content).__name__}, not text or parts")
        text = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
            elif kind in ("image", "image_url"):
                images.append(_part_image(part, record_images, used, referenced))
                text.append(IMAGE_PLACEHOLDER + "\n")
            else:
                raise Reject("bad_conversation", f"message {i} has a part that is not text or image: {part!r:.80}")
        turns.append((role, "".join(text)))
    if len(referenced) < len(record_images):  # an image no turn shows would be dropped silently
        raise Reject(
            "bad_conversation", f"the record has {len(record_images)} image(s) but its messages show {len(referenced)}"
        )
    return turns, images


def check_turns(
    turns: list[tuple[str, str]], n_images: int, drop_system: bool, n_videos: int = 0
) -> list[tuple[str, str]]:
    """The turns the loader can train on (system turns dropped when asked), or :class:`Reject`."""
    if any(role == "system" for role, _ in turns):
        if not drop_system:
            raise Reject("system_message_unsupported", "the conversation has a system message (--drop-system)")
        turns = [t for t in turns if t[0] != "system"]
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise Reject("roles_out_of_order", f"turn {i} is {role}; turns must alternate user, assistant, ...")
    answers = [text for role, text in turns if role == "assistant"]
    if not answers:
        raise Reject("no_answer", "the conversation has no assistant turn")
    if any(not a.strip() for a in answers):
        raise Reject("empty_answer", f"assistant turn {[a.strip() for a in answers].index('')} is empty")
    # The loader expands placeholders in user turns only (conversation.encode_conversation).
    for placeholder, n, what in ((IMAGE_PLACEHOLDER, n_images, "image"), (VIDEO_PLACEHOLDER, n_videos, "video")):
        if any(placeholder in text for role, text in turns if role == "assistant"):
            raise Reject("bad_conversation", f"an assistant turn holds an {placeholder} placeholder")
        n_placeholders = sum(text.count(placeholder) for _, text in turns)
        if n_placeholders != n:
            raise Reject("bad_conversation", f"{n} {what}(s) but {n_placeholders} {placeholder} placeholder(s)")
    return turns


# ---------------------------------------------------------------------------------------------------- images
def image_bytes(ref: object, image_root: str, missing: str = "missing_image") -> bytes:
    """The bytes ``ref`` names: embedded bytes, a ``{"bytes", "path"}`` table cell, a data URI or a local path
    (``missing``: the reject reason of an absent file or a reference of no such kind)."""
    if isinstance(ref, dict):  # datasets' Image feature cell
        ref = ref.get("bytes") if ref.get("bytes") is not None else ref.get("path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if not isinstance(ref, str) or not ref:
        raise Reject(missing, f"the reference is {type(ref).__name__}, not a path, URL or bytes")
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if not header.endswith(";base64"):
            raise Reject("corrupt_image", f"data URI {header!r:.60} is not base64")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise Reject("corrupt_image", f"data URI payload is not base64: {e}") from None
    if ref.startswith(_REMOTE_SCHEMES):
        raise Reject("remote_image_unsupported", f"{ref:.120} is remote: download the images and point at the files")
    path = Path(ref[len("file://") :] if ref.startswith("file://") else ref).expanduser()
    if not path.is_absolute():
        path = Path(image_root) / path
    try:
        return path.read_bytes()
    except OSError as e:
        raise Reject(missing, f"{path}: {e.strerror or e}") from None


def image_member(data: bytes, image_format: str) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a validated image: decoded in full first, so a truncated file is caught here."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt = image.format
            if image_format == "source" and fmt in _KEPT_FORMATS:
                return _KEPT_FORMATS[fmt], data
            # The loader converts to RGB anyway (shards.SampleEncoder): do it once here.
            rgb = image.convert("RGB")
    # Decoders of untrusted bytes raise many types (OSError, SyntaxError, struct.error, DecompressionBombError...):
    # whatever a decoder raises means "cannot be decoded", the one thing this stage decides.
    except Exception as e:
        raise Reject("corrupt_image", f"{type(e).__name__}: {e}") from None
    out = io.BytesIO()
    if image_format == "jpg":
        rgb.save(out, format="JPEG", quality=95)
        return "jpg", out.getvalue()
    rgb.save(out, format="PNG", optimize=False)
    return "png", out.getvalue()


#: The first bytes each container the loader reads starts with (ISO-BMFF boxes for mp4 / mov; EBML for webm / mkv).
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")


def _container_matches(ext: str, data: bytes) -> bool:
    if ext in ("mp4", "mov"):
        return data[4:8] in _ISO_BOXES
    if ext in ("webm", "mkv"):
        return data.startswith(b"\x1a\x45\xdf\xa3")
    return data.startswith(b"RIFF") and data[8:12] == b"AVI "


def video_member(ref: object, image_root: str) -> tuple[str, bytes]:
    """``(container extension, bytes)`` of a video file. Its frames are not decoded here (that needs the target's
    video processor and torchvision): an empty file, an unknown container or bytes of another format are caught,
    a truncated file is counted as ``corrupt_video`` by the loader."""
    if not isinstance(ref, str) or ref.startswith(("data:", *_REMOTE_SCHEMES)):
        raise Reject("missing_video", f"a video reference must be a local path, got {ref!r:.80}")
    ext = Path(ref).suffix.lower().lstrip(".")
    if ext not in VIDEO_KEYS:
        raise Reject("corrupt_video", f"{ref}: .{ext} is not a container the loader reads ({', '.join(VIDEO_KEYS)})")
    data = image_bytes(ref, image_root, missing="missing_video")
    if not _container_matches(ext, data):
        raise Reject("corrupt_video", f"{ref}: {len(data)} bytes that are not a {ext} file")
    return ext, data


# ---------------------------------------------------------------------------------------------------- target
class TargetCheck:
    """Encode a finished sample exactly as training will (``shards.SampleEncoder`` with the target's prompt builder:
    its chat template, image processing and visual-token layouts; tokenizer and processor files only, no weights)
    and reject what the loader would skip or what is longer than ``max_length``."""

    def __init__(self, target: str, max_length: int):
        from ..targets import load_prompt_builder
        from .shards import SampleEncoder

        # The loader's first-skip warnings would repeat what rejects.jsonl records for every sample.
        logging.getLogger("specvlm_lit.data.shards").setLevel(logging.ERROR)
        self.encoder = SampleEncoder(load_prompt_builder(target), max_length=None)
        self.max_length = max_length

    def __call__(self, key: str, members: tuple[tuple[str, bytes], ...]) -> None:
        out = self.encoder({"__key__": key, **dict(members)})
        if out is None:
            reason = next(k for k in self.encoder.take_skipped() if k != "seen")
            raise Reject(
                reason if reason in REASONS else "bad_conversation", f"the target's loader skips it ({reason})"
            )
        n = len(out["input_ids"])
        if n > self.max_length:
            raise Reject("too_long", f"{n} tokens, visual tokens included, more than --max-length {self.max_length}")


# ---------------------------------------------------------------------------------------------------- worker
_options: ConvertOptions | None = None
_target_check: TargetCheck | None = None


def init_worker(options: ConvertOptions, in_pool: bool = True) -> None:
    """Pool initializer (also called in-process for ``--workers 1``, ``in_pool=False``)."""
    global _options, _target_check
    if in_pool:  # the pool already uses every core: a tokenizer thread pool per worker would only contend for them
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _options = options
    _target_check = TargetCheck(options.target, options.max_length) if options.target else None


def convert_record(task: Task) -> Converted | Rejected:
    record = task.record
    try:
        if isinstance(record, Malformed):
            raise Reject("bad_json", record.detail)
        if not isinstance(record, dict):
            raise Reject("bad_json", f"the record is a {type(record).__name__}, not a JSON object")
        turns, images = messages_turns(record) if task.schema == "messages" else llava_turns(record)
        videos = record_videos(record)
        if videos and task.schema == "messages":  # dropping them would silently train on text that names a clip
            raise Reject("bad_conversation", "videos are read from LLaVA-format records (<video> in a turn) only")
        turns = check_turns(turns, len(images), _options.drop_system, len(videos))
        key = sample_key(task.ordinal)
        encoded = [image_member(image_bytes(ref, _options.image_root), _options.image_format) for ref in images]
        clips = [video_member(ref, _options.image_root) for ref in videos]
        video_exts = [f"v{i}.{ext}" for i, (ext, _) in enumerate(clips)]
        # One image keeps the plain <key>.<ext> layout; several are numbered in placeholder order; none: text only.
        exts = (
            [ext for ext, _ in encoded] if len(encoded) == 1 else [f"{i}.{ext}" for i, (ext, _) in enumerate(encoded)]
        )
        sample = {
            "id": record_id(record, task),
            "images": [f"{key}.{ext}" for ext in exts],
            **({"videos": [f"{key}.{ext}" for ext in video_exts]} if clips else {}),
            "conversations": [{"from": "human" if r == "user" else "gpt", "value": t} for r, t in turns],
        }
        json_member = ("json", json.dumps(sample, ensure_ascii=False).encode("utf-8"))
        members = (json_member, *((ext, data) for ext, (_, data) in zip(exts + video_exts, encoded + clips)))
        if _target_check is not None:
            _target_check(key, members)
        return Converted(task.ordinal, key, members)
    except Reject as r:
        return Rejected(task.ordinal, task.source, task.index, record_id(record, task), r.reason, r.detail)


def default_workers() -> int:
    return os.cpu_count() or 1
