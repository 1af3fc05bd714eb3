"""LightningDataModule over LLaVA-format webdataset shards (synthetic or real)."""

from __future__ import annotations

import functools
import itertools
import math
import os
import random

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader

from ..target import visual_token_counter
from .shards import BadSampleMonitor, SampleEncoder, batched_by_size, collate, encode_stage, shard_pipeline


def expand_shards(urls) -> list[str]:
    return (
        list(wds.shardlists.expand_urls(urls))
        if isinstance(urls, str)
        else [u for x in urls for u in wds.shardlists.expand_urls(x)]
    )


def _epoch_shards(shards: list[str], seed: int, epoch: int):
    """Endless shard stream for one epoch: passes over the list, each shuffled by (seed, epoch, pass).

    The order is identical on every rank, so split_by_node hands ranks disjoint shards within a pass;
    being endless, every rank can always fill its fixed batch count (a rank running dry would leave
    the others waiting forever in DDP's all-reduce).
    """

    def stage(_=None):
        for p in itertools.count():
            order = shards[:]
            random.Random(f"{seed}/{epoch}/{p}").shuffle(order)
            for url in order:
                yield {"url": url}

    return stage


def _skip(n: int):
    def stage(items):
        return itertools.islice(items, n, None)

    return stage


class ShardDataModule(L.LightningDataModule):
    """Streams shards into image-size-bucketed, padded batches, encoded with the target's processor.

    Two modes for training data:
    - ``samples_per_epoch=None``: an endless resampled stream (step-based recipes, ``trainer.max_steps``);
    - ``samples_per_epoch=N``: epochs of N samples (over all ranks). Each epoch the shard order is
      reshuffled by (seed, epoch), shards are split disjointly over DDP ranks and loader workers, and
      every rank yields the same number of batches (DDP needs equal step counts). Use with
      ``reload_dataloaders_every_n_epochs=1`` so each epoch's loader is built for that epoch; a resumed
      run skips the batches its checkpoint had already consumed (exact data position).

    ``processor`` is the target's processor or its directory (tokenizer + image processor; the target module
    says how many visual tokens an image becomes). With ``corpus_dir`` and ``generate_if_missing``, the
    synthetic corpus is generated there by :meth:`prepare_data` (rank 0 only, before any loader starts).
    Unusable samples are skipped and counted; more than ``max_bad_fraction`` of them stops the run.
    """

    def __init__(
        self,
        train_urls,
        val_urls,
        processor,
        *,
        batch_size: int = 16,
        max_length: int = 1024,
        shuffle_buffer: int = 1000,
        num_workers: int = 1,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        corpus_dir: str | None = None,
        generate_if_missing: bool = False,
        max_bad_fraction: float = 0.05,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if samples_per_epoch is not None and samples_per_epoch < batch_size:
            raise ValueError(f"samples_per_epoch ({samples_per_epoch}) must be at least batch_size ({batch_size})")
        if isinstance(processor, (str, os.PathLike)):
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(processor)
        self.train_urls, self.val_urls = train_urls, val_urls
        self.encoder = SampleEncoder(
            processor.tokenizer, processor.image_processor, visual_token_counter(processor), max_length
        )
        self.collate = functools.partial(collate, pad_id=processor.tokenizer.pad_token_id)
        self.batch_size, self.shuffle_buffer, self.num_workers, self.seed = (
            batch_size,
            shuffle_buffer,
            num_workers,
            seed,
        )
        self.samples_per_epoch = samples_per_epoch
        self.corpus_dir, self.generate_if_missing = corpus_dir, generate_if_missing
        self.bad_samples = BadSampleMonitor(max_bad_fraction)
        self._resume = None  # (epoch, batches already consumed in it)

    def prepare_data(self) -> None:
        if self.corpus_dir and self.generate_if_missing:
            from ..synthetic.generate import CorpusSpec, ensure_corpus

            ensure_corpus(self.corpus_dir, CorpusSpec())

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Skip counts travel inside training batches (they are counted in loader workers); the run stops here,
        # in the training process, once too many samples were unusable.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and "stats" in batch:
            self.bad_samples.update(batch["stats"])
        return batch

    # Lightning stores this in checkpoints: the data position for exact resume.
    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None or self.samples_per_epoch is None:
            return {}
        loop = trainer.fit_loop
        return {"epoch": trainer.current_epoch, "batches_done": loop.epoch_loop.batch_progress.current.completed}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume = (state["epoch"], state["batches_done"])

    def batches_per_rank(self, world_size: int) -> int:
        return max(1, self.samples_per_epoch // (self.batch_size * world_size))

    def train_dataloader(self) -> DataLoader:
        if self.samples_per_epoch is None:
            pipe = shard_pipeline(
                self.train_urls, self.encoder, shuffle_buffer=self.shuffle_buffer, seed=self.seed, resample=True
            )
            pipe.append(batched_by_size(self.batch_size, self.collate))
            return self._loader(pipe, persistent=True)
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        per_rank = self.batches_per_rank(world)
        workers = max(1, self.num_workers)
        per_worker = math.ceil(per_rank / workers)
        shards = expand_shards(self.train_urls)
        if len(shards) < world * workers:
            raise ValueError(
                f"{len(shards)} training shard(s) cannot be split disjointly over {world} rank(s) x {workers} "
                f"loader worker(s): write more shards (python -m specvlm_lit.synthetic --samples-per-shard ...) "
                f"or use fewer devices / data.num_workers"
            )
        stages = [
            _epoch_shards(shards, self.seed, epoch),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=self.encoder.tar_error),
        ]
        if self.shuffle_buffer:
            stages.append(
                wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 256), seed=self.seed + epoch)
            )
        stages += [encode_stage(self.encoder), batched_by_size(self.batch_size, self.collate, flush_partial=False)]
        pipe = wds.DataPipeline(*stages).with_epoch(per_worker)
        if self._resume is not None and self._resume[0] == epoch and self._resume[1] > 0:
            pipe.append(_skip(math.ceil(self._resume[1] / workers)))
        self._resume = None
        return self._loader(pipe, persistent=False, length=per_rank)

    def val_dataloader(self) -> DataLoader:
        pipe = shard_pipeline(self.val_urls, self.encoder, shuffle_buffer=0, seed=self.seed)
        pipe.append(batched_by_size(self.batch_size, self.collate))
        return self._loader(pipe, persistent=False)

    def _loader(self, pipe, persistent: bool, length: int | None = None) -> DataLoader:
        if length is not None:
            pipe = pipe.with_length(length)
        # Batches are formed inside the pipeline (bucketed by image size), so the loader does not batch.
        return DataLoader(
            pipe, batch_size=None, num_workers=self.num_workers, persistent_workers=persistent and self.num_workers > 0
        )
