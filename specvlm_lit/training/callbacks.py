"""Lightning callbacks of drafter training: measurements that are not part of the loss."""

from __future__ import annotations

import time

import lightning as L
import torch

from ..data.shards import sample_images
from ..errors import UserError


class CallbackConfigError(UserError):
    """A callback setting out of range (callbacks.<name>.<key>)."""


class ValidationDecoding(L.Callback):
    """Real average accepted length (``val/sigma``) of greedy tree decoding with the current drafter.

    Keeps the first ``samples`` validation prompts of each validation epoch (each conversation up to its first answer
    token, i.e. exactly what a user would send) and decodes them with :class:`SpeculativeDecoder` at the end of the
    epoch. Skipped during Lightning's sanity check. ``samples=0`` turns it off.
    """

    def __init__(self, samples: int = 4, max_new_tokens: int = 48):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise CallbackConfigError(f"callbacks.validation_decoding.samples must be an integer >= 0, got {samples!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise CallbackConfigError(
                f"callbacks.validation_decoding.max_new_tokens must be an integer >= 1, got {max_new_tokens!r}"
            )
        self.samples, self.max_new_tokens = samples, max_new_tokens
        self._prompts: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for i in range(batch["input_ids"].shape[0]):
            if len(self._prompts) >= self.samples:
                return
            answer = batch["loss_mask"][i].nonzero()
            if answer.numel():
                self._prompts.append((batch["input_ids"][i, : int(answer[0])].unsqueeze(0), sample_images(batch, i)))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        prompts, self._prompts = self._prompts, []
        if not prompts or trainer.sanity_checking:
            return
        from ..decoding.acceptance import WarpConfig
        from ..decoding.speculative import SpeculativeDecoder, TreeConfig

        target = pl_module.target
        decoder = SpeculativeDecoder(target, pl_module.drafter, TreeConfig(), WarpConfig())
        tokens = rounds = 0
        for ids, pixels in prompts:
            feats = target.encode_images(pixels)  # the sample's images: any number, none for text only
            out = decoder.generate(
                ids.to(pl_module.device),
                image_features=feats,
                image_layouts=target.layouts_of(pixels),  # the family's layout of each visual
                max_new_tokens=self.max_new_tokens,
                eos_token_id=target.text_config.eos_token_id,
            )
            tokens += out.stats.new_tokens
            rounds += out.stats.rounds
        pl_module.log("val/sigma", tokens / max(rounds, 1), prog_bar=True, sync_dist=True)


class Throughput(L.Callback):
    """``train/samples_per_s`` of every training step (teacher forward + drafter step + optimiser), on the bar."""

    def __init__(self):
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        n = batch["input_ids"].shape[0]
        pl_module.log(
            "train/samples_per_s", n / max(time.perf_counter() - self._start, 1e-9), prog_bar=True, batch_size=n
        )
