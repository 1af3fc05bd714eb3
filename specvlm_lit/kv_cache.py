"""In-place edits of a transformers KV cache: the two operations speculative decoding needs, for target and drafter.

* :func:`crop` rolls a cache back to its first ``length`` entries (tree rows drafted, then dropped; a timing run
  undone).
* :func:`compact` keeps the prefix plus the accepted path of a verified tree and drops the other tree entries.
* :func:`compact_rows` is the same for a batch whose rows keep different numbers of entries at different places
  (batched speculative decoding, :mod:`specvlm_lit.decoding.batched`).

Both work on any ``DynamicCache``-style cache (``cache.layers[i].keys / .values`` of shape ``[B, kv_heads, seq,
head_dim]``), whatever model filled it. transformers 5 detail relied on: ``Cache.crop`` takes a *negative* number
of tokens to remove (positive values raise).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["GrowingLayer", "compact", "compact_rows", "crop", "growing"]


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


def compact_rows(cache: Cache, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, length: int) -> Cache:
    """Per-row compaction of a batched cache, in place: entry ``src[i]`` of batch row ``rows[i]`` moves to slot
    ``dst[i]`` of the same row (every source is read before any destination is written), then every row is cut to
    ``length`` slots. Slots a row does not use keep stale values; the caller masks them. Returns ``cache``."""
    device_index = {}
    for layer in _full_attention_layers(cache):
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue
        dev = layer.keys.device
        if dev not in device_index:
            device_index[dev] = tuple(t.to(dev, torch.long) for t in (rows, src, dst))
        r, s, d = device_index[dev]
        if r.numel():
            layer.keys[r, :, d] = layer.keys[r, :, s]
            layer.values[r, :, d] = layer.values[r, :, s]
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]
    return cache


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends in place: its keys / values are views of buffers that grow by doubling, so a
    decoding step copies only its new entries instead of concatenating the whole cache (``torch.cat`` per layer per
    forward). Cropping, :func:`compact` and :func:`compact_rows` keep the views (they slice or write in place); an
    operation that replaces the tensors (``batch_select_indices``) just makes the next update copy once."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        t = key_states.shape[-2]
        kb = getattr(self, "_kbuf", None)
        if (
            kb is None
            or self.keys.data_ptr() != kb.data_ptr()
            or self.keys.shape[:-2] != key_states.shape[:-2]
            or n + t > kb.shape[-2]
        ):
            cap = max(2 * (n + t), 64)
            kb = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
            vb = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
            if n:
                kb[..., :n, :] = self.keys
                vb[..., :n, :] = self.values
            self._kbuf, self._vbuf = kb, vb
        self._kbuf[..., n : n + t, :] = key_states
        self._vbuf[..., n : n + t, :] = value_states
        self.keys = self._kbuf[..., : n + t, :]
        self.values = self._vbuf[..., : n + t, :]
        return self.keys, self.values


def growing(cache: Cache) -> Cache:
    """``cache`` (a fresh ``DynamicCache``) with :class:`GrowingLayer` layers instead of plain ``DynamicLayer`` ones
    (in place; other layer types are left alone). Returns ``cache``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer and not getattr(layer, "is_initialized", False):
                layers[i] = GrowingLayer()
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    return cache
