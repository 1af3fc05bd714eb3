"""The image and video members of one webdataset sample, as its json names them.

A sample is ``<key>.json`` plus members. Images: the json's ``images`` list names them in placeholder order
(``<key>.png``, ``<key>.0.png``, ``<key>.1.jpg``, ...; ``[]`` = none); a json without the list (and without videos)
is the original one-image layout (the first of ``<key>.png|jpg|jpeg|webp``). Videos: the json's ``videos`` list,
in the order of the ``<video>`` placeholders, each entry one of

* a video file member (``<key>.0.mp4``, ``.webm``, ``.mkv``, ``.mov``, ``.avi``), decoded and sampled by the target's
  Hugging Face video processor (its frame-sampling settings are the checkpoint's; needs torchvision);
* a list of image members, the clip's frames in time order (``["<key>.0.f0.jpg", "<key>.0.f1.jpg", ...]``), for
  data stored as extracted frames; they also go through the video processor;
* a ``.safetensors`` member holding the clip as the family's video processor already processed it
  (:func:`processed_video_bytes`): read as it is, so it needs no torchvision (pre-processed corpora, CPU machines).

Everything here raises :class:`SampleSkip` for what a sample holds wrong, never another error.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from ..targets.inputs import VisualInputs

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
VIDEO_KEYS = ("mp4", "webm", "mkv", "mov", "avi")
PROCESSED_VIDEO_KEY = "safetensors"
#: The tensors a processed-video member may hold (one clip): the family's video-processor outputs, and Qwen3-VL's
#: frame times (seconds, one per temporal patch) that its prompt text shows.
_PROCESSED_FIELDS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "video_timestamps")


class SampleSkip(Exception):
    """A sample the loader cannot use; ``reason`` is its skip-count key (``skips.SKIP_REASONS``)."""

    def __init__(self, reason: str, detail: object):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _member(sample: dict, name: str, missing: str) -> tuple[str, bytes]:
    """``(extension, bytes)`` of the member the json calls ``name``; :class:`SampleSkip` (``missing``) if absent."""
    key = sample.get("__key__", "")
    # webdataset splits a member name at its first dot: "<key>.0.png" is the key's "0.png" entry.
    ext = name[len(key) + 1 :] if name.startswith(f"{key}.") else name.partition(".")[2]
    if ext not in sample:
        raise SampleSkip(missing, f"the json names {name!r} but the sample has no such member")
    return ext, sample[ext]


def image_members(sample: dict, record: dict) -> list[tuple[str, bytes]]:
    """``(extension, bytes)`` of the sample's images, in placeholder order (see the module doc). Raises
    :class:`SampleSkip` (``missing_image``, ``bad_conversation``) when a named member is absent or the list is
    malformed."""
    names = record.get("images")
    if names is None and "videos" in record:
        return []  # a video sample names its images (if any) explicitly
    if names is None:
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        if ext is None:
            raise SampleSkip("missing_image", f"no {'/'.join(IMAGE_KEYS)} member and no 'images' list in the json")
        return [(ext, sample[ext])]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SampleSkip("bad_conversation", f"'images' must be a list of member names, got {names!r:.80}")
    return [_member(sample, name, "missing_image") for name in names]


@dataclass(frozen=True)
class VideoFile:
    """A video file's bytes as stored in the shard (``ext``: its container, ``mp4``, ``webm``, ...)."""

    ext: str
    data: bytes


def video_members(sample: dict, record: dict) -> list:
    """The sample's videos in placeholder order, each as its json entry says (see the module doc): a
    :class:`VideoFile`, a list of ``(extension, bytes)`` frames, or the ``(extension, bytes)`` of a processed clip.
    ``[]`` when the json names none. :class:`SampleSkip` (``missing_video``, ``bad_conversation``) when an entry is
    malformed or names an absent member."""
    entries = record.get("videos")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise SampleSkip("bad_conversation", f"'videos' must be a list, got {entries!r:.80}")
    out = []
    for entry in entries:
        if isinstance(entry, list) and entry and all(isinstance(n, str) for n in entry):
            out.append([_member(sample, name, "missing_video") for name in entry])
            continue
        if not isinstance(entry, str):
            raise SampleSkip(
                "bad_conversation",
                f"a 'videos' entry must name a video file, a .safetensors clip or a list of frames, got {entry!r:.80}",
            )
        ext, data = _member(sample, entry, "missing_video")
        kind = ext.rpartition(".")[2].lower()
        if kind in VIDEO_KEYS:
            out.append(VideoFile(kind, data))
        elif kind == PROCESSED_VIDEO_KEY:
            out.append((ext, data))
        else:
            raise SampleSkip(
                "bad_conversation",
                f"video member {entry!r} is neither a video file ({'/'.join(VIDEO_KEYS)}) nor a processed clip "
                f"(.{PROCESSED_VIDEO_KEY}); give frames as a list of image members",
            )
    return out


def open_image(ext: str, data: bytes, reason: str = "corrupt_image") -> Image.Image:
    """One member's bytes as an RGB PIL image; :class:`SampleSkip` (``reason``) when they do not decode."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise SampleSkip(reason, f"{ext}: {e}") from None


def processed_video_bytes(video: VisualInputs) -> bytes:
    """One clip's processed inputs (the family's video processor outputs for exactly one video) as the bytes of a
    ``.safetensors`` member, the form :func:`open_videos` reads back without a video processor."""
    from safetensors.torch import save

    if video.count("video") != 1 or video.pixel_values is not None:
        raise ValueError(
            f"processed_video_bytes takes one video's inputs (no images), got {video.count('video')} video(s)"
            + (" and images" if video.pixel_values is not None else "")
        )
    tensors = {name: getattr(video, name) for name in _PROCESSED_FIELDS[:3] if getattr(video, name) is not None}
    if video.video_timestamps is not None and video.video_timestamps[0] is not None:
        tensors["video_timestamps"] = torch.tensor(video.video_timestamps[0], dtype=torch.float64)
    return save({name: t.contiguous() for name, t in tensors.items()})


def _processed_video(ext: str, data: bytes) -> VisualInputs:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise SampleSkip("corrupt_video", f"{ext}: not a readable safetensors file ({e})") from None
    unknown = set(tensors) - set(_PROCESSED_FIELDS)
    if "pixel_values_videos" not in tensors or unknown:
        raise SampleSkip(
            "corrupt_video",
            f"{ext}: a processed clip holds pixel_values_videos (+ video_grid_thw, second_per_grid_ts, "
            f"video_timestamps), got {sorted(tensors)}",
        )
    timestamps = tensors.pop("video_timestamps", None)
    video = VisualInputs(**tensors, video_timestamps=None if timestamps is None else [timestamps.tolist()])
    if video.count("video") != 1:
        raise SampleSkip("corrupt_video", f"{ext}: a processed clip holds one video, this one {video.count('video')}")
    return video


@contextlib.contextmanager
def open_videos(videos: list):
    """:func:`video_members`' videos as the prompt builder takes them -- processed clips as :class:`VisualInputs`,
    frames as lists of PIL images, video files as paths of temporary copies (HF's video processors open files by
    path) -- for the ``with`` block's lifetime; the copies are removed after it."""
    with tempfile.TemporaryDirectory(prefix="specvlm-video-") as tmp:
        out = []
        for i, video in enumerate(videos):
            if isinstance(video, VideoFile):
                path = os.path.join(tmp, f"{i}.{video.ext}")
                with open(path, "wb") as f:
                    f.write(video.data)
                out.append(path)
            elif isinstance(video, list):
                out.append([open_image(ext, data, reason="corrupt_video") for ext, data in video])
            else:
                out.append(_processed_video(*video))
        yield out
