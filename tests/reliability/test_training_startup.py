"""train.py's start-up checks (issue 19, item 9, training part): a user mistake fails before any model loads, as one
line naming the field and the fix; the CLI prints it without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import train as train_script
from specvlm_lit.errors import UserError
from specvlm_lit.training.startup import StartupError, check_devices
from tests.test_train import REPO, train_cfg


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    from specvlm_lit.target import TargetAdapter

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the start-up checks")

    monkeypatch.setattr(TargetAdapter, "from_pretrained", refuse)


def _a_checkpoint(path, **extra) -> None:
    state = {"state_dict": {"drafter.w": torch.zeros(512, 512)}, "epoch": 0, "global_step": 4, **extra}
    torch.save(state, path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("not a checkpoint"), "does not load as a checkpoint"),
        (  # a kill mid-write with the old CheckpointIO: the first half of a real checkpoint
            lambda p: (_a_checkpoint(p, optimizer_states=[], loops={}), p.write_bytes(p.read_bytes()[:100_000])),
            "does not load as a checkpoint",
        ),
        (lambda p: _a_checkpoint(p), "lacks optimizer_states, loops"),  # weights only: cannot resume training
    ],
    ids=["missing", "directory", "garbage", "truncated", "weights_only"],
)
def test_a_bad_ckpt_path_fails_before_any_model_loads(
    tiny_target, small_corpus, tmp_path, no_model_loads, make, message
):
    ckpt = tmp_path / "last.ckpt"
    make(ckpt)
    cfg = train_cfg(tiny_target, small_corpus, tmp_path / "out", f"ckpt_path={ckpt}")
    with pytest.raises(StartupError, match=message) as e:
        train_script.run(cfg)
    assert str(e.value).startswith(f"ckpt_path={ckpt}") and "drop ckpt_path" in str(e.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.devices=abc", "trainer.devices with trainer.accelerator=cpu must be a positive number"),
        ("trainer.accelerator=gpux", "trainer.accelerator must be one of auto, cpu, cuda, gpu"),
        ("trainer.max_epochs=0", "trainer.max_epochs must be an integer >= 1, or -1"),
        ("trainer.max_steps=0", "trainer.max_steps must be an integer >= 1, or -1"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be an integer >= 1"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be a number >= 0"),
        ("model.optimizer.lr=-0.001", "model.optimizer.lr must be a number >= 0"),
        ("model.optimizer.betas=[0.9,1.5]", r"model.optimizer.betas must be two numbers in \[0, 1\)"),
        ("model.scheduler.warmup_steps=0", "model.scheduler.warmup_steps must be an integer >= 1"),
        # refused by Lightning when train.py builds the Trainer, which it does before the data and the models
        ("trainer.limit_val_batches=-1", "trainer: .*limit_val_batches"),
        ("+callbacks.model_checkpoint.every_n_train_steps=-2", "callbacks.model_checkpoint: .*every_n_train_steps"),
    ],
)
def test_out_of_range_settings_fail_before_any_model_loads(
    tiny_target, small_corpus, tmp_path, no_model_loads, override, message
):
    with pytest.raises(StartupError, match=message):
        train_script.run(train_cfg(tiny_target, small_corpus, tmp_path, override))


def test_a_user_error_raised_while_building_the_model_is_not_wrapped_by_hydra(tiny_target, small_corpus, tmp_path):
    # drafter settings are validated by OnlineDistillation itself (before it loads the target); Hydra used to wrap
    # the error in an InstantiationException, which the CLI printed as a traceback
    cfg = train_cfg(tiny_target, small_corpus, tmp_path, "drafter.unroll_steps=0")
    with pytest.raises(UserError, match="drafter.unroll_steps must be an integer >= 1"):
        train_script.run(cfg)


@pytest.mark.parametrize(
    ("accelerator", "devices", "gpus", "error"),
    [
        ("cpu", "auto", 0, None),
        ("cpu", "2", 0, None),
        ("cpu", [0, 1], 0, "trainer.devices with trainer.accelerator=cpu"),
        ("gpu", -1, 0, None),  # all visible GPUs: Lightning counts them
        ("gpu", "0,1", 2, None),
        ("gpu", [0, 1], 2, None),
        ("gpu", [0, 3], 2, "names GPU 3 but 2 are visible"),
        ("gpu", 4, 2, "trainer.devices=4 GPUs requested but 2 are visible"),
        ("gpu", "zero", 2, "a list of GPU ids such as"),
        ("gpu", [], 2, "a list of GPU ids such as"),
        ("gpu", 0, 2, "trainer.devices must be >= 1"),
    ],
)
def test_device_forms_lightning_accepts_pass_and_others_name_the_valid_ones(
    monkeypatch, accelerator, devices, gpus, error
):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    node = OmegaConf.create({"accelerator": accelerator, "devices": devices})
    if error is None:
        check_devices(node)
    else:
        with pytest.raises(StartupError, match=error):
            check_devices(node)


@pytest.mark.parametrize(
    ("override", "field"),
    [("ckpt_path=/nonexistent/run/checkpoints/last.ckpt", "ckpt_path="), ("trainer.devices=abc", "trainer.devices")],
)
def test_the_cli_prints_one_line_and_no_traceback(tmp_path, override, field):
    out = subprocess.run(
        [sys.executable, "train.py", "debug=tiny", f"hydra.run.dir={tmp_path}", override],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {field}"), out.stderr[-2000:]
