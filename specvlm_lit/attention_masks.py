"""Additive attention masks for KV-cached forwards whose rows must not see everything causal attention would allow.

Target tree verification, drafter tree growth and draft-cache extension all hand the decoder layers a 4D float mask
``[1, 1, q, past + q]``. It is *additive* (``0`` = attend, ``finfo(dtype).min`` = blocked) because eager attention
adds the mask to the scores; SDPA accepts the same float mask, so one mask serves both implementations. transformers'
``masking_utils.create_causal_mask`` returns a 4D mask unchanged, so no causal mask is built on top of it. Using
``finfo.min`` rather than ``-inf`` keeps softmax NaN-free in low precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["additive_mask", "as_additive", "causal_mask", "prefix_mask"]


def additive_mask(allowed: Tensor, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """Bool mask (True = attend) -> float mask of the same shape: ``0`` where allowed, ``finfo(dtype).min`` else."""
    device = allowed.device if device is None else device
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed.to(device=device, dtype=torch.bool), torch.finfo(dtype).min)


def as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A caller's bool (True = attend) or additive float mask, as an additive mask in ``dtype``."""
    if mask.dtype == torch.bool:
        return additive_mask(mask, dtype)
    if not mask.is_floating_point():
        raise ValueError("attention_mask must be additive float (0 / finfo.min) or bool (True = attend)")
    # Casting an fp32 finfo.min mask to bf16/fp16 can round it to -inf; clamp back to the finite minimum.
    return mask.to(dtype).clamp(min=torch.finfo(dtype).min)


def prefix_mask(block: Tensor, prefix_len: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Additive ``[1, 1, q, prefix_len + k]`` mask: every row sees the whole cached prefix, then ``block [q, k]``.

    ``block`` (bool, True = attend) says which of the ``k`` rows after the prefix each of the ``q`` new rows sees,
    e.g. a draft tree's ancestor-or-self mask.
    """
    q = block.shape[0]
    sees_prefix = torch.ones(q, prefix_len, dtype=torch.bool, device=block.device)
    return additive_mask(torch.cat([sees_prefix, block.to(torch.bool)], dim=1), dtype, device)[None, None]


def causal_mask(q: int, past: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Additive causal mask ``[1, 1, q, past + q]`` for ``q`` new rows after ``past`` cached rows."""
    return prefix_mask(torch.ones(q, q, dtype=torch.bool, device=device).tril(), past, dtype, device)
