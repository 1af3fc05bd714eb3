"""Start-up checks of ``train.py``: a configuration that cannot run fails here, before any model loads.

Each check raises :class:`StartupError` (a :class:`~specvlm_lit.errors.UserError`, printed as one ``error: ...`` line)
naming the config field and the fix. They cover what Lightning or torch would only refuse late (after the target
loaded, or once ``fit`` starts) or with a message that does not name the field; what Lightning itself validates
when the Trainer is built is left to it (train.py builds the Trainer before the models, and reports its refusal as
one line too).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError

__all__ = ["StartupError", "check_ckpt_path", "check_compressor", "check_config", "check_devices", "check_ranges"]


class StartupError(UserError):
    """A configuration that cannot run, caught before any model work."""


def check_config(cfg: DictConfig) -> None:
    """Every start-up check of a training config (train.py calls this first)."""
    check_devices(cfg.trainer)
    check_ranges(cfg)
    check_compressor(cfg)
    check_ckpt_path(cfg.get("ckpt_path"))
    check_sharded_target(cfg)


# --------------------------------------------------------------------------------------------------- devices
_CPU_DEVICES = "a positive number of CPU processes (e.g. trainer.devices=2) or auto"
_GPU_DEVICES = "a positive number of GPUs, -1 (all visible ones), a list of GPU ids such as [0,1] or '0,1', or auto"


def _accelerators() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})


def _parse_devices(devices) -> int | list[int] | str | None:
    """Lightning's forms of ``devices``: ``"auto"``, a count (int or digits), or a list of ids; None if none of them."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str):
        s = devices.strip()
        if s == "auto":
            return s
        if re.fullmatch(r"-?\d+", s):
            return int(s)
        if re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", s):  # Lightning reads "0,1" (and "1,") as GPU ids
            return [int(x) for x in s.split(",") if x.strip()]
        return None
    if isinstance(devices, Sequence) or OmegaConf.is_list(devices):
        ids = list(devices)
        if ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            return ids
    return None


def check_devices(trainer_cfg: DictConfig) -> None:
    accel = str(trainer_cfg.get("accelerator", "cpu"))
    if accel not in _accelerators():
        raise StartupError(f"trainer.accelerator must be one of {', '.join(_accelerators())}; got {accel!r}")
    raw = trainer_cfg.get("devices", 1)
    devices = _parse_devices(raw)
    if accel == "cpu":
        if devices == "auto":
            return
        if not isinstance(devices, int):
            raise StartupError(f"trainer.devices with trainer.accelerator=cpu must be {_CPU_DEVICES}; got {raw!r}")
        if devices < 1:
            raise StartupError(f"trainer.devices must be >= 1, got {devices}")
        have = os.cpu_count() or 1
        if devices > have:
            raise StartupError(
                f"trainer.devices={devices} CPU processes requested but this machine has {have} cores; "
                f"use trainer.devices<={have}"
            )
        return
    if devices is None:
        raise StartupError(f"trainer.devices must be {_GPU_DEVICES}; got {raw!r}")
    if isinstance(devices, int) and devices < 1 and devices != -1:
        raise StartupError(f"trainer.devices must be >= 1 (or -1 for all GPUs), got {devices}")
    if accel not in ("gpu", "cuda"):
        return  # auto / mps / tpu: Lightning picks and counts those devices itself
    have = torch.cuda.device_count()
    fix = f"use trainer.devices={max(have, 1)} or trainer=cpu / trainer=ddp_sim"
    if isinstance(devices, int) and devices > have:
        raise StartupError(f"trainer.devices={devices} GPUs requested but {have} are visible; {fix}")
    if isinstance(devices, list) and max(devices) >= have:
        raise StartupError(
            f"trainer.devices={raw} names GPU {max(devices)} but {have} are visible (ids 0..{have - 1}); {fix}"
        )


def check_sharded_target(cfg: DictConfig) -> None:
    """``trainer=fsdp`` with validation decoding on: refused here, before a 72B target is loaded, rather than by the
    strategy once it is (``sharding.check_collective_safe`` says why the two cannot run together)."""
    strategy = cfg.trainer.get("strategy")
    target = str(strategy.get("_target_", "")) if OmegaConf.is_dict(strategy) else ""
    if not target.endswith("ShardedTargetStrategy"):
        return
    vd = (cfg.get("callbacks") or {}).get("validation_decoding")
    if vd is not None and int(vd.get("samples", 0) or 0) > 0:
        raise StartupError(
            "trainer=fsdp shards the target, so every target forward is a collective, and "
            "callbacks.validation_decoding runs a different number of them on each rank (it would hang): add "
            "callbacks.validation_decoding=null and measure sigma with decode.py after training"
        )


# ---------------------------------------------------------------------------------------------------- ranges
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


#: trainer.<key>: (accepts the value, what the value must be). None always means Lightning's default.
_TRAINER_RANGES = {
    "max_epochs": (lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1, or -1 for no epoch limit"),
    "min_epochs": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "max_steps": (lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1, or -1 for no step limit"),
    "accumulate_grad_batches": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (1 = no accumulation)"),
    "gradient_clip_val": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 or null = no clipping)"),
    "log_every_n_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = never)"),
    "check_val_every_n_epoch": (lambda v: _is_int(v) and v >= 1, "an integer >= 1, or null"),
}
_OPTIMIZER_RANGES = {
    "lr": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "eps": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "momentum": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "betas": (
        lambda v: (
            (OmegaConf.is_list(v) or isinstance(v, (list, tuple)))
            and len(v) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in v)
        ),
        "two numbers in [0, 1), e.g. [0.9, 0.95]",
    ),
}


def _check_node(node: DictConfig | None, prefix: str, ranges: dict) -> None:
    if node is None:
        return
    for key, (ok, must) in ranges.items():
        value = node.get(key)
        if value is not None and not ok(value):
            raise StartupError(f"{prefix}.{key} must be {must}; got {value!r}")


def check_ranges(cfg: DictConfig) -> None:
    """Numbers Lightning or torch accept silently or refuse only once training starts (after the models loaded)."""
    _check_node(cfg.trainer, "trainer", _TRAINER_RANGES)
    model = cfg.get("model") or {}
    _check_node(model.get("optimizer"), "model.optimizer", _OPTIMIZER_RANGES)
    scheduler = model.get("scheduler")
    if scheduler is not None and "warmup_steps" in scheduler:
        w = scheduler.warmup_steps
        if not (_is_int(w) and w >= 1):
            raise StartupError(
                f"model.scheduler.warmup_steps must be an integer >= 1 (model.scheduler=null: none); got {w!r}"
            )


# ------------------------------------------------------------------------------------------------ compressor
def check_compressor(cfg: DictConfig) -> None:
    from ..drafter.compressor import normalize_compressor_config

    try:  # strict: a bad compressor config fails here, listing the valid choices, before any model loads
        normalize_compressor_config(OmegaConf.to_container(cfg.compressor) if cfg.compressor else None)
    except ValueError as e:
        raise StartupError(f"compressor: {e}") from None


# ------------------------------------------------------------------------------------------------- ckpt_path
#: ckpt_path values Lightning resolves itself (the newest / best checkpoint of this run's ModelCheckpoint, ...).
_LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc")
#: What a checkpoint must hold to resume training (a ``save_weights_only`` checkpoint lacks the last two).
_RESUME_KEYS = ("state_dict", "epoch", "global_step", "optimizer_states", "loops")


def check_ckpt_path(ckpt_path) -> None:
    """``ckpt_path`` names a file that loads as a Lightning training checkpoint (read memory-mapped: cheap)."""
    if ckpt_path is None:
        return
    given = str(ckpt_path)
    if given in _LIGHTNING_CKPT_KEYWORDS or given.startswith("registry") or "://" in given:
        return  # Lightning resolves these (and remote URLs) itself
    fix = "point it at a checkpoint train.py wrote (<run>/checkpoints/last.ckpt), or drop ckpt_path to start afresh"
    path = Path(given).expanduser()
    if path.is_dir():
        raise StartupError(f"ckpt_path={given} is a directory, not a checkpoint file; {fix}")
    if not path.is_file():
        raise StartupError(f"ckpt_path={given} does not exist; {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, not a torch file, pickled objects a resume would refuse too
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise StartupError(
            f"ckpt_path={given} does not load as a checkpoint (truncated or not one? {why}); {fix}"
        ) from None
    missing = [k for k in _RESUME_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise StartupError(
            f"ckpt_path={given} is not a Lightning training checkpoint that can resume (it lacks {', '.join(missing)}; "
            f"a weights-only checkpoint or a drafter export cannot resume training); {fix}"
        )
