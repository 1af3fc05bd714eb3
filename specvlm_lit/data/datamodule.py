"""LightningDataModule over LLaVA-format webdataset shards (synthetic or real)."""

from __future__ import annotations

import functools

import lightning as L
from torch.utils.data import DataLoader

from .shards import SampleEncoder, batched_by_size, collate, shard_pipeline


def llava_visual_tokens(height: int, width: int, patch_size: int) -> int:
    """Visual tokens a LLaVA tower yields for an image ("default" strategy: the CLS token is dropped)."""
    return (height // patch_size) * (width // patch_size)


class ShardDataModule(L.LightningDataModule):
    def __init__(self, train_urls, val_urls, tokenizer, image_processor, num_visual_tokens, *, batch_size: int = 16,
                 max_length: int = 1024, shuffle_buffer: int = 1000, num_workers: int = 1, seed: int = 0,
                 resample_train: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train_urls, self.val_urls = train_urls, val_urls
        self.encoder = SampleEncoder(tokenizer, image_processor, num_visual_tokens, max_length)
        self.collate = functools.partial(collate, pad_id=tokenizer.pad_token_id)
        self.batch_size, self.shuffle_buffer, self.num_workers, self.seed = batch_size, shuffle_buffer, num_workers, seed
        self.resample_train = resample_train

    def _loader(self, urls, train: bool) -> DataLoader:
        pipe = shard_pipeline(urls, self.encoder, shuffle_buffer=self.shuffle_buffer if train else 0,
                              seed=self.seed, resample=train and self.resample_train)
        # Batches are formed inside the pipeline (bucketed by image size), so the loader does not batch.
        pipe.append(batched_by_size(self.batch_size, self.collate))
        return DataLoader(pipe, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0 and train)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_urls, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_urls, train=False)
