"""In-place edits of a transformers KV cache: the two operations speculative decoding needs, for target and drafter.

* :func:`crop` rolls a cache back to its first ``length`` entries (tree rows drafted, then dropped; a timing run
  undone).
* :func:`compact` keeps the prefix plus the accepted path of a verified tree and drops the other tree entries.

Both work on any ``DynamicCache``-style cache (``cache.layers[i].keys / .values`` of shape ``[B, kv_heads, seq,
head_dim]``), whatever model filled it. transformers 5 detail relied on: ``Cache.crop`` takes a *negative* number
of tokens to remove (positive values raise).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

__all__ = ["compact", "crop"]


def crop(cache: Cache, length: int) -> Cache:
    """Truncate ``cache`` to its first ``length`` entries, in place; returns it."""
    current = cache.get_seq_length()
    if length < 0 or length > current:
        raise ValueError(f"crop: cannot crop a cache of length {current} to {length}.")
    if length < current:
        cache.crop(length - current)
    return cache


def _full_attention_layers(cache: Cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"Expected a transformers Cache with per-layer storage, got {type(cache).__name__}.")
    for idx, layer in enumerate(layers):
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise NotImplementedError(
                f"Cache layer {idx} ({type(layer).__name__}) is not a plain full-attention layer; "
                f"compaction is only implemented for DynamicLayer."
            )
        yield layer


def compact(cache: Cache, prefix_len: int, keep: torch.Tensor) -> Cache:
    """Keep the prefix plus the tree entries at relative indices ``keep`` (in that order); drop the rest.

    After a tree forward appended ``n`` node entries after ``prefix_len`` cached tokens, the accepted root-to-leaf
    path is ``keep``; its K/V are moved right after the prefix so the cache again looks like a plain forward over
    ``prefix + path`` (RoPE was applied with the nodes' explicit positions, which are exactly the positions the path
    tokens have in that sequence). Works in place on every layer; returns ``cache``.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
    for layer in _full_attention_layers(cache):
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue
        total = layer.keys.shape[-2]
        n = total - prefix_len
        if n < 0 or (keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= n)):
            raise IndexError(
                f"compact: keep={keep.tolist()} out of range for {n} tree entries after a prefix of "
                f"{prefix_len} (cache length {total})."
            )
        # Move only the kept tree entries (a few rows) right after the prefix and cut the tail:
        # copying the whole prefix every decode round would make compaction O(context).
        src = (prefix_len + keep).to(layer.keys.device)
        end = prefix_len + keep.numel()
        layer.keys[..., prefix_len:end, :] = layer.keys.index_select(-2, src)
        layer.values[..., prefix_len:end, :] = layer.values.index_select(-2, src)
        layer.keys = layer.keys[..., :end, :]
        layer.values = layer.values[..., :end, :]
    return cache
