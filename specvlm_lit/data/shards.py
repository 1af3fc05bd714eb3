"""Stream LLaVA-format webdataset shards into padded training batches.

Each sample is ``<key>.{png,jpg,jpeg,webp}`` + ``<key>.json`` with a ``conversations`` list (the
synthetic corpus and converted real LLaVA data share this). Bad samples never stop the stream: they
are skipped and *counted*, and the counts travel inside the batches, so the training process sees
exact totals even when decoding runs in DataLoader workers.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable

import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from .conversation import ConversationError, encode_conversation

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class TooManyBadSamples(UserError):
    """More of the data is unusable than ``max_bad_fraction`` allows: the shards need fixing."""


class SampleEncoder:
    """Raw tar sample -> model inputs, or ``None`` (counted) when the sample is unusable."""

    def __init__(self, tokenizer, image_processor, num_visual_tokens: Callable[[int, int], int], max_length: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_visual_tokens = num_visual_tokens
        self.max_length = max_length
        self.skipped: Counter = Counter()  # since the last emitted sample (this worker)

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler: a corrupt tar member or unreadable shard is skipped and counted, not fatal.

        Counted in the same per-worker counter as bad samples, so it reaches the training process
        inside the next batch (or the end-of-stream marker)."""
        wds.warn_and_continue(exn)
        self.skipped["corrupt_tar"] += 1
        return True

    def __call__(self, sample: dict) -> dict | None:
        key = sample.get("__key__", "?")
        try:
            record = json.loads(sample["json"])
            conversations = record["conversations"]
        except (KeyError, ValueError, TypeError):
            self.skipped["bad_json"] += 1
            return None
        image_bytes = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image_bytes is None:
            self.skipped["missing_image"] += 1
            return None
        try:
            image = Image.open(io.BytesIO(image_bytes))
            image.load()
            image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError):
            self.skipped["corrupt_image"] += 1
            return None
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        n_visual = self.num_visual_tokens(*pixel_values.shape[-2:])
        try:
            enc = encode_conversation(conversations, self.tokenizer, n_visual, max_length=self.max_length)
        except ConversationError as e:
            self.skipped["no_answer" if "no assistant answer" in str(e) else "bad_conversation"] += 1
            return None
        if not enc.loss_mask.any():  # truncation removed every answer token
            self.skipped["truncated_away"] += 1
            return None
        out = {
            "__key__": key,
            "input_ids": enc.input_ids,
            "loss_mask": enc.loss_mask,
            "pixel_values": pixel_values,
            "record": record,
            "stats": dict(self.skipped) | {"truncated": int(enc.truncated), "seen": 1 + sum(self.skipped.values())},
        }
        self.skipped = Counter()
        return out


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
    stages.append(wds.tarfile_to_samples(handler=encoder.tar_error))
    if shuffle_buffer:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 256), rng=None))
    stages.append(encode_stage(encoder))
    return wds.DataPipeline(*stages)


def encode_stage(encoder: SampleEncoder):
    """webdataset stage: encode samples, dropping unusable ones; a final stats-only marker carries
    the counts of bad samples that no later good sample could carry."""

    def stage(samples):
        for raw in samples:
            out = encoder(raw)
            if out is not None:
                yield out
        if encoder.skipped:
            yield {"stats_only": dict(encoder.skipped) | {"seen": sum(encoder.skipped.values())}}
            encoder.skipped = Counter()

    return stage


def batched_by_size(batch_size: int, collate_fn, *, flush_partial: bool = True):
    """webdataset stage: batch samples of equal image size together.

    Mixed resolutions in one batch pad every row to the largest visual-token count; bucketing by
    image size removes that padding (2-3x fewer tokens per step on the synthetic corpus).
    One finished batch is held back so skip counts that arrive at the end of the stream can still
    be attached to a batch; counts are never dropped.
    """

    def stage(samples):
        buckets: dict[tuple, list] = {}
        pending: Counter = Counter()
        held = None
        for s in samples:
            if "stats_only" in s:
                pending.update(s["stats_only"])
                continue
            key = tuple(s["pixel_values"].shape[-2:])
            bucket = buckets.setdefault(key, [])
            bucket.append(s)
            if len(bucket) == batch_size:
                if held is not None:
                    yield held
                held = collate_fn(bucket)
                buckets[key] = []
        tail = [collate_fn(b) for b in buckets.values() if b] if flush_partial else []
        out = ([held] if held is not None else []) + tail
        for i, batch in enumerate(out):
            if i == len(out) - 1:
                batch["stats"] = dict(Counter(batch["stats"]) + pending)
            yield batch

    return stage


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest sample; keep images as a list (resolutions may differ)."""
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n], attention_mask[i, :n], loss_mask[i, :n] = s["input_ids"], 1, s["loss_mask"]
    stats: Counter = Counter()
    for s in samples:
        stats.update(s["stats"])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "pixel_values": [s["pixel_values"] for s in samples],
        "records": [s["record"] for s in samples],
        "keys": [s["__key__"] for s in samples],
        "stats": dict(stats),
    }


class BadSampleMonitor:
    """Accumulates skip counts from batches; raises once the bad fraction exceeds the limit."""

    def __init__(self, max_bad_fraction: float = 0.05, min_seen: int = 200):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction, self.min_seen = max_bad_fraction, min_seen
        self.counts: Counter = Counter()

    def update(self, stats: dict) -> None:
        self.counts.update(stats)
        seen = self.counts["seen"]
        bad = self.bad
        if seen >= self.min_seen and bad / seen > self.max_bad_fraction:
            raise TooManyBadSamples(
                f"{bad} of {seen} samples were unusable ({dict(self.reasons)}), more than "
                f"max_bad_fraction={self.max_bad_fraction}; check the shards or raise the limit"
            )

    @property
    def reasons(self) -> Counter:
        return Counter({k: v for k, v in self.counts.items() if k not in ("seen", "truncated")})

    @property
    def bad(self) -> int:
        return sum(self.reasons.values())
