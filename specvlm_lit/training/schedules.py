"""Learning-rate schedules that configs name by ``_target_`` (``_partial_: true``; the module passes the optimiser)."""

from __future__ import annotations

import torch


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * (step + 1) / warmup_steps for the first ``warmup_steps`` optimiser steps, then lr (stepped per step)."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(
            f"scheduler.warmup_steps must be an integer >= 1 (scheduler=null for none), got {warmup_steps!r}"
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
