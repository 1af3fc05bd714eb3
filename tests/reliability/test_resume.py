"""Exact resume (issue 19, item 5) and atomic checkpoints (item 6).

A run killed inside an epoch and resumed from the ``last.ckpt`` Lightning wrote ends with the same drafter, bit
for bit, as the run that was never interrupted, for the compressors that draw random numbers while training
(``select``: Gumbel noise, ``prune``: random subsets). Tiny target, batches of 4, 2 epochs of 4 steps. The
checkpoints are the ones a real run writes mid-epoch: ``callbacks.resume_checkpoint`` with ``every_n_train_steps=2``
(``last.ckpt`` every two steps) or validation inside the epoch
(``trainer.val_check_interval=2``, a checkpoint after each validation). The interruption comes right after such a
write, so the resumed run restores the data position mid-epoch and replays the rest, epoch boundaries included.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from omegaconf import open_dict

import train as train_script
from tests.test_train import train_cfg

STEPS = 8  # 2 epochs x (16 samples / batch 4)


class Interrupted(RuntimeError):
    """Raised in place of a kill."""


class InterruptAt(L.Callback):
    """Ends the run as a kill would, right after step ``step`` (and its checkpoint) and before step ``step + 1``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"interrupted after step {self.step}")


class FinalState(L.Callback):
    """Saves the drafter's weights and the optimiser state at the end of training (``last.ckpt`` need not hold them:
    a monitored ModelCheckpoint refreshes it only when it saves)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        state = {"drafter": pl_module.drafter.state_dict(), "optimizer": trainer.optimizers[0].state_dict()}
        torch.save(state, self.path)


def _cfg(tiny_target, small_corpus, out, compressor, *overrides):
    cfg = train_cfg(
        tiny_target,
        small_corpus,
        out,
        f"compressor={compressor}",
        "trainer.max_epochs=2",
        "callbacks.validation_decoding=null",  # decoding is not what this tests; it only costs time
        *overrides,
    )
    with open_dict(cfg):
        cfg.callbacks.final_state = {"_target_": f"{__name__}.FinalState", "path": str(out / "final.pt")}
    return cfg


@pytest.mark.parametrize(
    ("compressor", "interrupt_after", "checkpoints"),
    [
        ("select", 6, "+callbacks.resume_checkpoint.every_n_train_steps=2"),
        ("prune", 2, "trainer.val_check_interval=2"),
    ],
)
def test_interrupted_run_resumes_to_identical_weights(
    tiny_target, small_corpus, tmp_path, compressor, interrupt_after, checkpoints
):
    whole = train_script.run(_cfg(tiny_target, small_corpus, tmp_path / "whole", compressor, checkpoints))
    assert whole["global_step"] == STEPS

    cut = _cfg(tiny_target, small_corpus, tmp_path / "cut", compressor, checkpoints)
    with open_dict(cut):
        cut.callbacks.interrupt = {"_target_": f"{__name__}.InterruptAt", "step": interrupt_after}
    with pytest.raises(Interrupted):
        train_script.run(cut)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    written = torch.load(last, map_location="cpu", weights_only=False)
    assert written["global_step"] == interrupt_after  # the kill fell inside an epoch (4 steps each)
    assert interrupt_after % (STEPS // 2) != 0

    resumed = train_script.run(
        _cfg(tiny_target, small_corpus, tmp_path / "resumed", compressor, checkpoints, f"ckpt_path={last}")
    )
    assert resumed["global_step"] == STEPS

    a, b = (torch.load(tmp_path / run / "final.pt", weights_only=True) for run in ("whole", "resumed"))
    assert list(a["drafter"]) == list(b["drafter"])
    differ = [k for k in a["drafter"] if not torch.equal(a["drafter"][k], b["drafter"][k])]
    assert not differ, f"{len(differ)}/{len(a['drafter'])} drafter tensors differ after resume, e.g. {differ[:3]}"
    for p, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][p][name]), (p, name)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # learning rate included


# ------------------------------------------------------------------------------------ atomic checkpoint writes
class OutputDiskFills:
    """Fault injection: the checkpoint directory's filesystem fills up after ``room`` bytes of a checkpoint write,
    and TMPDIR is another filesystem (a rename from it fails with EXDEV, so a move out of it becomes a copy)."""

    def __init__(self, monkeypatch, tmpdir: Path, room: int):
        self.tmpdir, self.room = tmpdir.resolve(), room
        real_rename, real_replace, real_sendfile, real_save = os.rename, os.replace, os.sendfile, torch.save

        def cross_device(real):
            def move(src, dst, *a, **k):
                if self._in_tmpdir(src) and not self._in_tmpdir(dst):
                    raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
                return real(src, dst, *a, **k)

            return move

        def sendfile(out_fd, in_fd, offset, count):  # how shutil copies file to file on Linux
            sent = real_sendfile(out_fd, in_fd, offset, min(count, self.room))
            self.room -= sent
            if self.room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return sent

        def save(obj, f, *a, **k):  # a direct write onto the destination's filesystem
            if isinstance(f, io.BytesIO):
                return real_save(obj, f, *a, **k)
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[: self.room])
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "rename", cross_device(real_rename))
        monkeypatch.setattr(os, "replace", cross_device(real_replace))
        monkeypatch.setattr(os, "sendfile", sendfile)
        monkeypatch.setattr(torch, "save", save)

    def _in_tmpdir(self, p) -> bool:
        return Path(os.fsdecode(p)).resolve().is_relative_to(self.tmpdir)


def _checkpoint(step: int) -> dict:
    return {"state_dict": {"drafter.w": torch.full((256, 1024), float(step))}, "global_step": step, "epoch": 0}


def test_a_checkpoint_write_that_fails_midway_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    from specvlm_lit.training.checkpoint_io import AtomicCheckpointIO

    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    trainer = hydra.utils.instantiate(
        train_cfg("unused", "unused", tmp_path).trainer, logger=False, enable_checkpointing=False
    )
    checkpoint_io = trainer.strategy.checkpoint_io
    assert isinstance(checkpoint_io, AtomicCheckpointIO)  # every trainer config builds on conf/trainer/default.yaml
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint_io.save_checkpoint(_checkpoint(1), last)
    (last.parent / f".{last.name}.tmp-killed").write_bytes(b"partial")  # what a kill -9 mid-write leaves

    with monkeypatch.context() as m:
        OutputDiskFills(m, elsewhere, room=64 * 1024)
        with pytest.raises(OSError, match="No space left"):
            checkpoint_io.save_checkpoint(_checkpoint(2), last)
    assert checkpoint_io.load_checkpoint(last)["global_step"] == 1  # the previous checkpoint, whole
    assert sorted(p.name for p in last.parent.iterdir()) == [".last.ckpt.tmp-killed", "last.ckpt"]
    assert not list(elsewhere.iterdir())  # nothing left in TMPDIR

    checkpoint_io.save_checkpoint(_checkpoint(3), last)
    assert checkpoint_io.load_checkpoint(last)["global_step"] == 3
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # the killed write's leftover is gone
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert last.stat().st_mode == plain.stat().st_mode  # permissions as any file the run writes, not mkstemp's 0600
    assert not list(elsewhere.iterdir())
