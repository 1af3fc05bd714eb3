"""Makes skipped samples visible: a console line per epoch and at the end of fit, and the end-of-pass rule.

The counting and the rule live in the DataModule (``skips.BadSampleMonitor``); this callback calls
``ShardDataModule.end_pass`` where every rank arrives together (end of each training epoch and validation pass,
the sanity check included), which sums the counts over DDP ranks and raises on all of them if a pass broke the
rule, and prints what was skipped on rank 0::

    data: epoch 1 train: 3 of 64 read unusable: bad_json=3 (run: 5 of 128 read unusable: bad_json=5)
    data: epoch 0 val: 0 of 16 read unusable
    data, whole run: train 5 of 128 read unusable: bad_json=5; val 0 of 16 read unusable
"""

from __future__ import annotations

import lightning as L

from .skips import describe


class SkipReport(L.Callback):
    """Per-epoch and end-of-fit skip summaries (rank 0), and the end-of-pass check of the skip rule."""

    @staticmethod
    def _datamodule(trainer):
        dm = getattr(trainer, "datamodule", None)
        return dm if dm is not None and hasattr(dm, "end_pass") else None

    def _end(self, trainer, split: str) -> None:
        dm = self._datamodule(trainer)
        if dm is None:
            return
        monitor = dm.end_pass(split)  # raises on every rank if this pass broke the rule
        if not trainer.is_global_zero:
            return
        what = "sanity check" if trainer.sanity_checking else f"epoch {trainer.current_epoch}"
        text = f"data: {what} {split}: {describe(monitor.pass_counts)}"
        if monitor.counts != monitor.pass_counts and not trainer.sanity_checking:
            text += f" (run: {describe(monitor.counts)})"
        print(text, flush=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._end(trainer, "train")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._end(trainer, "val")

    def on_fit_end(self, trainer, pl_module) -> None:
        dm = self._datamodule(trainer)
        if dm is None:
            return
        lines = []
        for split, monitor in (("train", dm.bad_samples), ("val", dm.val_bad_samples)):
            monitor.sync(trainer)
            lines.append(f"{split} {describe(monitor.counts)}")
        if trainer.is_global_zero:
            print("data, whole run: " + "; ".join(lines), flush=True)
