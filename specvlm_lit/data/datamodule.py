"""LightningDataModule over LLaVA-format webdataset shards (synthetic or real)."""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader

from ..errors import UserError
from ..targets import as_prompt_builder
from .shards import (
    SampleEncoder,
    batched_by_size,
    collate,
    encode_stage,
    read_shards,
    shard_pipeline,
    skip_batches,
    take_batches,
)
from .skips import MIN_SEEN, BadSampleMonitor, TooManyBadSamples, describe
from .sources import check_shards, expand_shards, local_path

__all__ = ["DataConfigError", "ShardDataModule", "SkipCountingLoader", "expand_shards"]
log = logging.getLogger(__name__)


class DataConfigError(UserError):
    """A ``data.*`` value out of range."""


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


class SkipCountingLoader(DataLoader):
    """A DataLoader whose stream also carries skip counts: it hands every count to ``monitor`` and yields only
    batches, so the count of a skipped sample reaches the training process even when no batch can form.

    Single process, the rule is checked as the counts arrive (an all-corrupt stream stops within
    ``monitor.min_seen`` samples). Under DDP a rank must not raise alone (the others would wait for it in a
    collective): a rank that breaks the rule on its own counts before it can form another batch yields a marker
    batch instead, and ``ShardDataModule.on_before_batch_transfer`` stops every rank together.
    """

    def __init__(self, dataset, *, monitor: BadSampleMonitor, trainer_of=lambda: None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.monitor, self.trainer_of = monitor, trainer_of

    def __iter__(self):
        trainer = self.trainer_of()
        distributed = trainer is not None and trainer.world_size > 1
        self.monitor.distributed = distributed
        self.monitor.start_pass(sanity=bool(trainer is not None and trainer.sanity_checking))
        since_batch = 0  # samples read since the last batch (this rank)
        for item in super().__iter__():
            self.monitor.update(item["stats"])
            if not distributed:
                self.monitor.check()
            if "stats_only" not in item:
                since_batch = 0
                yield item
                continue
            since_batch += item["stats"].get("seen", 0)
            if distributed and since_batch >= self.monitor.min_seen and self.monitor.split == "train":
                if self.monitor.violation(self.monitor.pass_local) is not None:
                    yield {"skips_abort": True, "stats": {}}
                    return


class ShardDataModule(L.LightningDataModule):
    """Streams shards into image-size-bucketed, padded batches, encoded with the target's processor.

    Two modes for training data:
    - ``samples_per_epoch=None``: an endless resampled stream (step-based recipes, ``trainer.max_steps``);
    - ``samples_per_epoch=N``: epochs of N samples (over all ranks). Each epoch the shard order is
      reshuffled by (seed, epoch), shards are split disjointly over DDP ranks and loader workers, and
      every rank yields the same number of batches (DDP needs equal step counts). Use with
      ``reload_dataloaders_every_n_epochs=1`` so each epoch's loader is built for that epoch; a resumed
      run skips the batches its checkpoint had already consumed (exact data position).

    ``processor`` is the target's directory (its family's prompt builder is loaded from it:
    ``targets.load_prompt_builder``), a prompt builder, or an in-memory HF LLaVA-1.5 processor
    (``targets.as_prompt_builder``); every family fact -- chat format, image processing, visual-token layouts -- is
    the prompt builder's. With ``corpus_dir`` and ``generate_if_missing``, the
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
        bad_fraction_min_samples: int = MIN_SEEN,
    ):
        super().__init__()
        # Start-up checks: this runs before any model loads, so every mistake here costs nothing.
        for name, value, low in (("batch_size", batch_size, 1), ("max_length", max_length, 1)):
            if not isinstance(value, int) or value < low:
                raise DataConfigError(f"data.{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("num_workers", num_workers), ("shuffle_buffer", shuffle_buffer)):
            if not isinstance(value, int) or value < 0:
                raise DataConfigError(f"data.{name} must be an integer >= 0, got {value!r}")
        if samples_per_epoch is not None and (not isinstance(samples_per_epoch, int) or samples_per_epoch < batch_size):
            raise DataConfigError(
                f"data.samples_per_epoch ({samples_per_epoch!r}) must be at least data.batch_size ({batch_size}), "
                f"or null for an endless stream"
            )
        self.bad_samples = BadSampleMonitor("train", max_bad_fraction, bad_fraction_min_samples, source=str(train_urls))
        self.val_bad_samples = BadSampleMonitor("val", max_bad_fraction, bad_fraction_min_samples, source=str(val_urls))
        self.corpus_dir, self.generate_if_missing = corpus_dir, generate_if_missing
        self._pending_corpus = self._corpus_to_generate()
        self.train_urls, self.val_urls = train_urls, val_urls
        self._train_shards = check_shards(train_urls, "data.train_urls", pending=self._pending_corpus)
        self._val_shards = check_shards(val_urls, "data.val_urls", pending=self._pending_corpus)
        # The target family's own prompt builder: its chat format, processor outputs and visual-token layouts, with
        # images sized as decoding sizes them (so the drafter trains on what it will draft with).
        self.encoder = SampleEncoder(as_prompt_builder(processor), max_length)
        tok = self.encoder.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.collate = functools.partial(collate, pad_id=pad_id)
        self.batch_size, self.shuffle_buffer, self.num_workers, self.seed = (
            batch_size,
            shuffle_buffer,
            num_workers,
            seed,
        )
        self.samples_per_epoch = samples_per_epoch
        self._resume = None  # (epoch, batches already consumed in it)
        self._warned_workers: set[str] = set()

    def _corpus_to_generate(self):
        """``corpus_dir`` if :meth:`prepare_data` will generate the corpus there, after checking it may (a directory
        the project did not write is refused now, before any model loads, and left untouched)."""
        if not (self.corpus_dir and self.generate_if_missing):
            return None
        from ..synthetic.generate import MANIFEST, CorpusSpec, corpus_is_current
        from ..utils.atomic import check_replaceable

        if corpus_is_current(self.corpus_dir, CorpusSpec()):
            return None
        check_replaceable(self.corpus_dir, "corpus", published_before=lambda d: (d / MANIFEST).is_file())
        return local_path(str(self.corpus_dir))

    def prepare_data(self) -> None:
        if self.corpus_dir and self.generate_if_missing:
            from ..synthetic.generate import CorpusSpec, ensure_corpus

            ensure_corpus(self.corpus_dir, CorpusSpec())

    def setup(self, stage: str) -> None:
        if self._pending_corpus is not None:  # generated by prepare_data by now: the shards must all be there
            self._train_shards = check_shards(self.train_urls, "data.train_urls")
            self._val_shards = check_shards(self.val_urls, "data.val_urls")
            self._pending_corpus = None

    # ---------------------------------------------------------------------------------------------- skip counts
    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Under DDP the training counts are summed over ranks once per step -- every rank is here once per step --
        # so all ranks judge the same totals and stop together (single process, the loader judges them).
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and trainer.world_size > 1:
            monitor = self.bad_samples
            stalled = monitor.sync(trainer, flag="skips_abort" in batch)
            if stalled:
                raise monitor.violation(monitor.counts, end_of_pass=True) or TooManyBadSamples(
                    f"train data: a rank read {monitor.min_seen} or more samples in a row without enough usable ones "
                    f"to form a batch ({describe(monitor.counts)} over all ranks); fix or remove the bad shards, or "
                    f"raise data.max_bad_fraction"
                )
            monitor.check()
        return batch

    def end_pass(self, split: str) -> BadSampleMonitor:
        """Sum a pass's counts over ranks and judge them, end-of-pass rule (every rank must call this together).

        Called by :class:`~specvlm_lit.data.skip_report.SkipReport` at the end of each epoch and validation."""
        monitor = self.bad_samples if split == "train" else self.val_bad_samples
        monitor.sync(getattr(self, "trainer", None))
        monitor.check(end_of_pass=True)
        return monitor

    # Lightning stores this in checkpoints: the data position for exact resume, and the skip counts so far.
    def state_dict(self) -> dict:
        state = {"skips": {"train": self.bad_samples.state_dict(), "val": self.val_bad_samples.state_dict()}}
        trainer = getattr(self, "trainer", None)
        if trainer is not None and self.samples_per_epoch is not None:
            loop = trainer.fit_loop
            state |= {"epoch": trainer.current_epoch, "batches_done": loop.epoch_loop.batch_progress.current.processed}
        return state

    def load_state_dict(self, state: dict) -> None:
        if "epoch" in state:
            self._resume = (state["epoch"], state["batches_done"])
        skips = state.get("skips", {})
        self.bad_samples.load_state_dict(skips.get("train", {}))
        self.val_bad_samples.load_state_dict(skips.get("val", {}))

    # ---------------------------------------------------------------------------------------------- loaders
    def batches_per_rank(self, world_size: int) -> int:
        return max(1, self.samples_per_epoch // (self.batch_size * world_size))

    def _workers(self, n_shards: int, world: int, split: str) -> int:
        """Loader workers for ``n_shards`` split disjointly over ``world`` ranks: fewer than ``data.num_workers`` when
        there are too few shards (a worker without a shard would end the epoch early, or never yield), with a
        warning for training data; never fewer than 1 unless ``data.num_workers=0``."""
        per_rank = n_shards // world
        if per_rank == 0 and split == "train":
            raise DataConfigError(
                f"{n_shards} training shard(s) cannot be split over {world} DDP ranks: write at least {world} shards "
                f"(python -m specvlm_lit.synthetic --samples-per-shard ...) or use trainer.devices<={n_shards}"
            )
        if self.num_workers == 0:
            return 0
        use = max(1, min(self.num_workers, per_rank))
        if use < self.num_workers and split == "train" and split not in self._warned_workers:
            self._warned_workers.add(split)
            log.warning(
                "data.num_workers=%d but %d training shard(s) over %d rank(s) give only %d per rank: using %d loader "
                "worker(s); write more, smaller shards to load faster",
                self.num_workers,
                n_shards,
                world,
                per_rank,
                use,
            )
        return use

    def train_dataloader(self) -> DataLoader:
        if self.samples_per_epoch is None:
            pipe = shard_pipeline(
                self._train_shards, self.encoder, shuffle_buffer=self.shuffle_buffer, seed=self.seed, resample=True
            )
            pipe.append(batched_by_size(self.batch_size, self.collate))
            return self._loader(pipe, self.bad_samples, self.num_workers, persistent=True)
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        per_rank = self.batches_per_rank(world)
        num_workers = self._workers(len(self._train_shards), world, "train")
        workers = max(1, num_workers)
        per_worker = math.ceil(per_rank / workers)
        stages = [
            _epoch_shards(self._train_shards, self.seed, epoch),
            wds.split_by_node,
            wds.split_by_worker,
            read_shards(self.encoder),
        ]
        if self.shuffle_buffer:
            stages.append(
                wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 256), seed=self.seed + epoch)
            )
        stages += [encode_stage(self.encoder), batched_by_size(self.batch_size, self.collate, flush_partial=False)]
        stages.append(take_batches(per_worker))
        if self._resume is not None and self._resume[0] == epoch and self._resume[1] > 0:
            stages.append(skip_batches(math.ceil(self._resume[1] / workers)))
        self._resume = None
        return self._loader(wds.DataPipeline(*stages), self.bad_samples, num_workers, persistent=False, length=per_rank)

    def val_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        pipe = shard_pipeline(self._val_shards, self.encoder, shuffle_buffer=0, seed=self.seed)
        pipe.append(batched_by_size(self.batch_size, self.collate))
        return self._loader(pipe, self.val_bad_samples, self._workers(len(self._val_shards), world, "val"), False)

    def _loader(self, pipe, monitor, num_workers: int, persistent: bool, length: int | None = None) -> DataLoader:
        if length is not None:
            pipe = pipe.with_length(length)
        # Batches are formed inside the pipeline (bucketed by image size), so the loader does not batch.
        return SkipCountingLoader(
            pipe,
            monitor=monitor,
            trainer_of=lambda: getattr(self, "trainer", None),
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=persistent and num_workers > 0,
        )
