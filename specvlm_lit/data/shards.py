"""Stream LLaVA-format webdataset shards into padded training batches.

Each sample is ``<key>.json`` with a ``conversations`` list and its images: ``<key>.{png,jpg,jpeg,webp}`` (the
synthetic corpus, one image), or the members the json's ``images`` list names (converted data: ``<key>.png``,
``<key>.0.png``, ``<key>.1.jpg``, ... or none for a text-only sample; :func:`image_members`) and the videos its
``videos`` list names (video files, frame lists or processed clips; :mod:`.members`). Bad samples never
stop the stream: they are skipped and *counted* by reason (``skips.SKIP_REASONS``). The counts travel with the data
-- inside batches (``stats``) and, when many skips come without a usable sample, as stats-only items
(``{"stats_only": True, "stats": ...}``) -- so the training process sees exact totals even when decoding runs in
DataLoader workers, and sees them even when no batch can form.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections import Counter

import torch
import webdataset as wds

from ..target import image_list
from ..targets.inputs import VisualInputs
from .conversation import ConversationError, normalise
from .members import IMAGE_KEYS, SampleSkip, image_members, open_image, open_videos, video_members  # noqa: F401
from .skips import SEEN, TRUNCATED, TooManyBadSamples  # noqa: F401  (TooManyBadSamples: its old home)

#: Skips a worker may collect before it sends their counts on without waiting for a usable sample.
FLUSH_EVERY = 16
log = logging.getLogger(__name__)


def stats_item(stats: dict) -> dict:
    return {"stats_only": True, "stats": dict(stats)}


class SampleEncoder:
    """Raw tar sample -> model inputs, or ``None`` (counted by reason) when the sample is unusable.

    ``prompts`` is the target family's prompt builder (``targets.load_prompt_builder`` / ``targets.as_prompt_builder``):
    every family fact -- the chat format, the assistant-only loss mask, how images are sized and processed, the
    visual-token layouts -- is its ``render_conversation``'s; this class only reads shards and counts skips.

    Never raises on what a sample holds: every malformed shape is a skip. The first skip of each reason in a
    process is logged with the sample's key, so the cause can be found."""

    def __init__(self, prompts, max_length: int | None):
        if not callable(getattr(prompts, "render_conversation", None)):
            raise TypeError(
                f"SampleEncoder needs the target's prompt builder (specvlm_lit.targets.as_prompt_builder(<target dir "
                f"or processor>)), got {type(prompts).__name__}"
            )
        self.prompts = prompts
        self.max_length = max_length
        self.skipped: Counter = Counter()  # since the counts were last sent on (this worker)
        self._logged: set[str] = set()

    @property
    def tokenizer(self):
        return self.prompts.tokenizer

    def skip(self, reason: str, where: str, detail: object) -> None:
        self.skipped[reason] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("skipping %s (%s): %s; further %s skips are counted, not logged", where, reason, detail, reason)

    def take_skipped(self) -> dict:
        """The pending skip counts (``seen`` included) as a stats dict; resets them."""
        out = dict(self.skipped) | {SEEN: sum(self.skipped.values())}
        self.skipped = Counter()
        return out

    def open_images(self, sample: dict, record: dict) -> list:
        """The sample's images as RGB PIL images, in placeholder order; :class:`SampleSkip` when one is unusable."""
        return [open_image(ext, data) for ext, data in image_members(sample, record)]

    def render(self, sample: dict, record: dict):
        """The sample through the family's prompt builder: ids, assistant-only loss mask, processor outputs and
        layouts (``PromptInputs``)."""
        images = self.open_images(sample, record)
        videos = video_members(sample, record)
        messages = [{"role": role, "content": text} for role, text in normalise(record["conversations"])]
        with rendering_skips():
            if not videos:
                return self.prompts.render_conversation(messages, images, max_length=self.max_length)
            self.prompts.check_video()  # an image-only target skips the sample before its videos are decoded
            with open_videos(videos) as opened:
                return self.prompts.render_conversation(messages, images, max_length=self.max_length, videos=opened)

    def __call__(self, sample: dict) -> dict | None:
        key = sample.get("__key__", "?")
        where = f"sample {key} of {sample.get('__url__', '?')}"
        if "json" not in sample:
            return self.skip("missing_json", where, f"no .json member (members: {sorted(sample)})")
        try:
            record = json.loads(sample["json"])
        except ValueError as e:  # includes bad UTF-8
            return self.skip("bad_json", where, e)
        if not isinstance(record, dict):
            return self.skip("bad_json", where, f"the .json holds a {type(record).__name__}, not an object")
        if "conversations" not in record:
            return self.skip("bad_conversation", where, "the record has no 'conversations' field")
        try:
            rendered = self.render(sample, record)
        except SampleSkip as e:
            return self.skip(e.reason, where, e.detail)
        except ConversationError as e:
            return self.skip(e.reason, where, e)
        input_ids, loss_mask = rendered.input_ids[0], rendered.loss_mask[0]
        if not loss_mask.any():  # truncation removed every answer token
            return self.skip("truncated_away", where, f"max_length={self.max_length} cuts off every answer token")
        stats = self.take_skipped()
        stats[SEEN] += 1
        stats[TRUNCATED] = int(rendered.truncated)
        return {
            "__key__": key,
            "input_ids": input_ids,
            "loss_mask": loss_mask,
            "pixel_values": sample_visual(rendered.visual),
            "layouts": rendered.layouts,  # VisualLayout per image, in placeholder order
            "record": record,
            "stats": stats,
        }


@contextlib.contextmanager
def rendering_skips():
    """Turn what a prompt builder refuses about a sample into :class:`SampleSkip` (its ``reason`` when it has one:
    ``image_too_small``, ``corrupt_image``, ``no_answer``, ...); :class:`ConversationError` passes as it is."""
    from ..errors import UserError
    from ..targets import ImageTooSmallError, VideoProcessorUnavailable

    try:
        yield
    except (ConversationError, VideoProcessorUnavailable):  # the latter is the install's fault: every video would skip
        raise
    except ImageTooSmallError as e:
        raise SampleSkip("image_too_small", e) from None
    except UserError as e:
        raise SampleSkip(getattr(e, "reason", "bad_conversation"), e) from None


def sample_visual(visual) -> VisualInputs | list[torch.Tensor]:
    """A rendered sample's images as a sample carries them: the family's processor outputs for all its images (one
    :class:`VisualInputs`: AnyRes tiles and Qwen patches are not images), or one ``[3, h, w]`` tensor per image
    (pixels; ``[]`` = text only)."""
    if visual is None:
        return []
    return visual if isinstance(visual, VisualInputs) else image_list(visual)


def _complete(sample: dict) -> bool:
    """Whether a sample read up to a break in its shard has every member its json names (json first, then images
    and videos)."""
    if "json" not in sample:
        return False
    try:
        record = json.loads(sample["json"])
        record = record if isinstance(record, dict) else {}
        image_members(sample, record)
        video_members(sample, record)
    except (ValueError, SampleSkip):
        return False
    return True


def _record(errors: list, exn: Exception) -> bool:
    """webdataset handler: note the error and go on (the shard's reader decides what it costs)."""
    errors.append(exn)
    return True


def read_shards(encoder: SampleEncoder):
    """webdataset stage: shard URLs -> raw samples, one shard at a time so unreadable data is counted per shard.

    A shard that cannot be read to its end (truncated, corrupt, unopenable) counts once as ``corrupt_tar``; the
    incomplete sample at the break is part of that count, not a ``missing_image``/``missing_json``. A readable
    shard without samples counts as ``empty_shard``. Both counts are sent on at once as a stats-only item, so an
    endless stream over such shards still reports them (and stops) instead of spinning silently."""
    logged: set[str] = set()

    def stage(urls):
        for item in urls:
            url = item["url"]
            errors: list[Exception] = []
            held, n = None, 0
            for sample in wds.tarfile_to_samples(handler=functools.partial(_record, errors))(iter([item])):
                if held is not None:
                    yield held
                held, n = sample, n + 1
            if errors:
                if held is not None and not _complete(held):
                    held = None
                reason, detail = "corrupt_tar", str(errors[0].args[0] if errors[0].args else errors[0])
            elif n == 0:
                reason, detail = "empty_shard", "the shard holds no sample"
            else:
                reason = None
            if held is not None:
                yield held
            if reason is not None:
                if url not in logged:
                    logged.add(url)
                    log.warning("shard %s: %s (%s); counted, the stream goes on", url, detail, reason)
                yield stats_item({reason: 1, SEEN: 1})

    return stage


def shard_pipeline(
    urls: str | list[str], encoder: SampleEncoder, *, shuffle_buffer: int = 0, seed: int = 0, resample: bool = False
) -> wds.DataPipeline:
    """A pipeline over ``urls`` (paths, URLs or brace patterns like ``train-{000000..000011}.tar``).

    Split by node (DDP rank) and DataLoader worker, so ranks and workers see disjoint shards;
    ``resample=True`` draws shards with replacement forever (step-based training).
    """
    stages = [wds.ResampledShards(urls, seed=seed) if resample else wds.SimpleShardList(urls)]
    if not resample:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(read_shards(encoder))
    if shuffle_buffer:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 256), rng=None))
    stages.append(encode_stage(encoder))
    return wds.DataPipeline(*stages)


def encode_stage(encoder: SampleEncoder, flush_every: int = FLUSH_EVERY):
    """webdataset stage: encode samples, dropping unusable ones. Their counts ride on the next usable sample, or
    go on as a stats-only item once ``flush_every`` pile up (and at the end of the stream)."""

    def stage(samples):
        for raw in samples:
            if "stats_only" in raw:
                yield raw
                continue
            out = encoder(raw)
            if out is not None:
                yield out
            elif sum(encoder.skipped.values()) >= flush_every:
                yield stats_item(encoder.take_skipped())
        if encoder.skipped:
            yield stats_item(encoder.take_skipped())

    return stage


def _bucket(sample: dict) -> tuple:
    """Samples with equal keys batch without visual padding: the image sizes (LLaVA pixels), else each image's
    token layout (processor outputs); ``()`` for text-only samples."""
    if isinstance(sample["pixel_values"], VisualInputs):
        return tuple(tuple(layout.segments) + (layout.frames,) for layout in sample["layouts"])
    return tuple(tuple(p.shape[-2:]) for p in sample["pixel_values"])


def batched_by_size(batch_size: int, collate_fn, *, flush_partial: bool = True):
    """webdataset stage: batch samples of equal image size together; stats-only items pass straight through.

    Mixed resolutions in one batch pad every row to the largest visual-token count; bucketing by
    image size removes that padding (2-3x fewer tokens per step on the synthetic corpus).
    Without ``flush_partial`` the partial buckets left at the end are dropped, but their counts are sent on.
    """

    def stage(samples):
        buckets: dict[tuple, list] = {}
        for s in samples:
            if "stats_only" in s:
                yield s
                continue
            key = _bucket(s)
            bucket = buckets.setdefault(key, [])
            bucket.append(s)
            if len(bucket) == batch_size:
                yield collate_fn(bucket)
                buckets[key] = []
        for bucket in buckets.values():
            if bucket:
                yield collate_fn(bucket) if flush_partial else stats_item(sum_stats(bucket))

    return stage


def sum_stats(samples: list[dict]) -> dict:
    stats: Counter = Counter()
    for s in samples:
        stats.update(s["stats"])
    return dict(stats)


def take_batches(n: int):
    """webdataset stage: end the stream after ``n`` batches (stats-only items do not count)."""

    def stage(items):
        if n <= 0:
            return
        done = 0
        for item in items:
            yield item
            if "stats_only" not in item:
                done += 1
                if done == n:
                    return

    return stage


def skip_batches(n: int):
    """webdataset stage: drop the first ``n`` batches and the counts that came with them (a resumed run already
    holds those counts in its checkpoint)."""

    def stage(items):
        done = 0
        for item in items:
            if done >= n:
                yield item
            elif "stats_only" not in item:
                done += 1

    return stage


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest sample; images as one flat list (resolutions may differ).

    ``pixel_values`` holds every image of the batch, sample by sample in placeholder order -- the order
    ``TargetAdapter.embed`` scatters their features into the placeholders -- and ``image_counts[i]`` says how many
    are sample ``i``'s (0 for a text-only sample); :func:`sample_images` gives one sample's."""
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n], attention_mask[i, :n], loss_mask[i, :n] = s["input_ids"], 1, s["loss_mask"]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "pixel_values": _collate_images(samples),
        "image_counts": [_num_images(s["pixel_values"]) for s in samples],
        "layouts": [s.get("layouts") for s in samples],
        "records": [s["record"] for s in samples],
        "keys": [s["__key__"] for s in samples],
        "stats": sum_stats(samples),
    }


def _num_images(pixel_values) -> int:
    return pixel_values.num_images if isinstance(pixel_values, VisualInputs) else len(pixel_values)


def _collate_images(samples: list[dict]):
    """The batch's images in sample order: :func:`batch_visuals` of the samples' ``pixel_values``."""
    return batch_visuals([s["pixel_values"] for s in samples])


def batch_visuals(visuals: list):
    """Several prompts' images as one batch, prompt by prompt in placeholder order: one flat list of ``[3, h, w]``
    tensors (pixels; a prompt's are a list or ``[k, 3, h, w]``), or the prompts' processor outputs as one
    ``VisualInputs`` (``VisualInputs.concat``, laid out as the HF processor lays out a batch; ``None`` when no prompt
    has images)."""
    if any(isinstance(v, VisualInputs) for v in visuals):
        return VisualInputs.concat([v for v in visuals if isinstance(v, VisualInputs)])
    return [p for v in visuals if v is not None and len(v) for p in image_list(v)]


def sample_images(batch: dict, i: int) -> list:
    """Sample ``i``'s entries of a batch's flat per-image list ``batch["pixel_values"]`` (see :func:`collate`)."""
    counts = batch.get("image_counts") or [1] * len(batch["pixel_values"])
    if isinstance(batch["pixel_values"], VisualInputs):  # the family's processor outputs: this sample's share
        return batch["pixel_values"].sample(i, counts) or []
    start = sum(counts[:i])
    return batch["pixel_values"][start : start + counts[i]]
