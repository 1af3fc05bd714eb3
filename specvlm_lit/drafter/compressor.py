"""Elastic visual compressor: shrinks the visual rows the *drafter* sees (the target always sees all of them).

Every compressor implements the ``VisualCompressor`` protocol of :mod:`specvlm_lit.drafter.sequence`::

    compressor(embeds [N, H], features [N, H], layout VisualLayout, question [Q, H]) -> CompressedVisual

A call covers **one visual** (an image or a video): for a prompt with several, ``build_draft_sequence`` calls the
compressor once per visual (its own rows, its own :class:`~specvlm_lit.targets.VisualLayout`; every visual sees the
same question, the text after the last one), so each gated compressor picks a branch per visual. A text-only sample
has no visual rows and the compressor is not called at all.

Layouts (the family's, ``adapter.layouts_of``). Grid compressors (pool / conv, and the window-aligned prune of
weighted) work on each plain patch grid of :meth:`VisualLayout.pieces` on its own, in token order: a plain image's
one grid; AnyRes's base grid and its unpadded tile grid (never a window across the two, nor across a tile row's
``image_newline``); Qwen's merged grid; every frame of a video. Tokens in no grid (AnyRes newlines, CLS) are
dropped by them. Prune and the resampler work on all N tokens of the layout, whatever its shape. The gated
combinators decide once per layout (one gate call per visual).

``embeds`` (token side, e_{t+1}) and ``features`` (feature side, f_t) are *aligned*: row j of both belongs to the
same drafter position. Output row m of both streams must again describe the same thing, so every compressor applies
the *same* reduction to both streams:

* prune keeps the same row indices in both streams;
* pool / conv work on the concatenated ``[N, 2H]`` rows laid out on each patch grid; pooling is per channel and the
  conv is grouped (``groups=2``: one ``H -> H`` conv per stream), so each output row's embedding half only sees
  embeddings and its feature half only sees features, taken from the *same* grid window;
* the resampler computes one set of attention weights per query (keys built from both streams) and applies them to
  the concatenated rows, so both halves are mixtures of the same source rows;
* the gated combinators (select / weighted) mix or pick whole ``[M, 2H]`` outputs.

Keeping the streams separate (rather than mixing embedding and feature channels) matters because the drafter
normalises the two halves with separate RMSNorms (their scales differ by orders of magnitude) before its ``fc``; a
compressor output must stay "an embedding-like row" and "a feature-like row".

Configuration is a plain JSON-able dict (``{"type": "prune", "ratio": 4}``), so it can live in
``EagleVLMConfig.compressor`` and ``from_pretrained`` rebuilds the same module; see :func:`build_compressor`,
:func:`normalize_compressor_config` and :func:`compressor_config_dict`.

Ratio -> kernel mapping used by pool / conv / weighted (:func:`kernel_for_ratio`): the near-square kernel
``(kh, kw)`` in ``{(k, k), (k, k + 1)}`` whose area ``kh * kw`` is closest to ``ratio`` on a log scale (ties go to the
smaller area). E.g. 1 -> 1x1, 2 -> 1x2, 3 -> 2x2, 4 -> 2x2, 5 -> 2x3, 6 -> 2x3, 9 -> 3x3, 10 -> 3x3, 16 -> 4x4,
20 -> 4x5. Windows use ceil mode, so a grid that is not a multiple of the kernel keeps its border patches (in
smaller edge windows): ``M = ceil(rows / kh) * ceil(cols / kw)``.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init

from ..targets.inputs import GridPiece, VisualLayout
from .sequence import CompressedVisual

__all__ = [
    "COMPRESSOR_TYPES",
    "Compressor",
    "ConcatCompressor",
    "ConvCompressor",
    "PoolCompressor",
    "PruneCompressor",
    "QuestionGate",
    "ResamplerCompressor",
    "SelectCompressor",
    "TextOnlyCompressor",
    "WeightedCompressor",
    "build_compressor",
    "compressor_config_dict",
    "default_concat_branches",
    "default_select_branches",
    "kernel_for_ratio",
    "normalize_compressor_config",
]

DEFAULT_GATE_HIDDEN = 128
DEFAULT_TAU = 1.0


# ----------------------------------------------------------------------------------------------------- helpers
def kernel_for_ratio(ratio: float) -> tuple[int, int]:
    """Near-square window ``(kh, kw)`` whose area best matches ``ratio`` (see the module docstring)."""
    ratio = float(ratio)
    if ratio < 1:
        raise ValueError(f"compression ratio must be >= 1, got {ratio}")
    best, best_err = (1, 1), abs(math.log(ratio))
    k = 1
    while k * k <= 4 * ratio:
        for kh, kw in ((k, k), (k, k + 1)):
            err = abs(math.log(kh * kw) - math.log(ratio))
            # strict "<": on a tie the smaller area (found first) wins
            if err < best_err - 1e-12:
                best, best_err = (kh, kw), err
        k += 1
    return best


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _grid_to_map(rows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[K * R * W, C]`` rows of K row-major ``R x W`` grids, one after the other -> ``[K, C, R, W]`` maps.

    One grid keeps the exact view it always had: its strides decide the memory layout of the pooled output and so
    the float summation order of every later reduction (a plain grid must train bit-identically)."""
    r, c = grid
    k = rows.shape[0] // (r * c)
    if k == 1:
        return rows.t().reshape(1, rows.shape[1], r, c)
    return rows.t().reshape(rows.shape[1], k, r, c).transpose(0, 1)


def _map_to_rows(fmap: torch.Tensor) -> torch.Tensor:
    """``[K, C, R, W]`` -> ``[K * R * W, C]`` row-major rows, grid after grid (one grid: the view it always had)."""
    if fmap.shape[0] == 1:
        return fmap.flatten(2)[0].t()
    return fmap.flatten(2).transpose(1, 2).reshape(-1, fmap.shape[1])


def _piece_index(piece: GridPiece, device: torch.device) -> torch.Tensor | slice:
    """Where ``piece``'s rows are in its visual's rows: a slice when they are contiguous (a plain grid, a frame), so
    no index has to be copied to the device; else the index tensor (AnyRes tiles skip their newline tokens)."""
    first, n = int(piece.index[0]), piece.index.numel()
    if int(piece.index[-1]) - first + 1 == n:  # ascending offsets spanning exactly n tokens: contiguous
        return slice(first, first + n)
    return piece.index.to(device)


def _grid_runs(layout: VisualLayout) -> list[list[GridPiece]]:
    """The layout's grid pieces in token order, consecutive pieces of the same shape (a video's frames) grouped, so
    a grid compressor handles each group in one batched call."""
    runs: list[list[GridPiece]] = []
    for piece in layout.pieces():
        if runs and (runs[-1][0].rows, runs[-1][0].cols) == (piece.rows, piece.cols):
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return runs


def _per_grid(rows: torch.Tensor, layout: VisualLayout, reduce_maps) -> torch.Tensor:
    """``reduce_maps([K, C, R, W]) -> [K, C, R', W']`` over every grid piece of ``layout`` (``rows`` ``[N, C]`` are
    the visual's rows), the outputs row-major and in token order; tokens in no piece are dropped."""
    outs = []
    for run in _grid_runs(layout):
        picked = [rows[_piece_index(piece, rows.device)] for piece in run]
        grid_rows = picked[0] if len(picked) == 1 else torch.cat(picked)
        outs.append(_map_to_rows(reduce_maps(_grid_to_map(grid_rows, (run[0].rows, run[0].cols)))))
    if not outs:
        return rows[:0]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _windowed_output_tokens(layout: VisualLayout, kernel: tuple[int, int]) -> int:
    """Rows a ``kernel`` window grid (ceil mode) leaves of the layout: the sum over its grid pieces."""
    kh, kw = kernel
    return sum(_ceil_div(p.rows, kh) * _ceil_div(p.cols, kw) for p in layout.pieces())


def _split(rows: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[:, :h], rows[:, h:]


# ---------------------------------------------------------------------------------------------------- base class
class Compressor(nn.Module):
    """Base class: input validation, the protocol call signature and config serialisation.

    Subclasses implement :meth:`_compress` (inputs already validated), :meth:`num_output_tokens` and
    :meth:`config_dict`. Randomness (random pruning, Gumbel noise) is only used in ``training`` mode; in eval mode
    every compressor is deterministic, which speculative decoding needs (the drafter must see the same rows when it
    re-encodes a prompt).
    """

    type_name: ClassVar[str] = ""
    #: hidden size the module's parameters were built for (None = works for any width)
    hidden_size: int | None = None

    def forward(
        self,
        embeds: torch.Tensor,
        features: torch.Tensor,
        layout: VisualLayout,
        question: torch.Tensor | None = None,
    ) -> CompressedVisual:
        self._check_inputs(embeds, features, layout, question)
        if question is None:
            question = features.new_zeros((0, features.shape[-1]))
        return self._compress(embeds, features, layout, question)

    def _check_inputs(self, embeds, features, layout, question) -> None:
        if embeds.dim() != 2 or features.dim() != 2 or embeds.shape != features.shape:
            raise ValueError(
                f"{type(self).__name__}: embeds and features must be aligned [N, H] rows, got "
                f"{tuple(embeds.shape)} and {tuple(features.shape)}"
            )
        if not isinstance(layout, VisualLayout):
            raise ValueError(
                f"{type(self).__name__}: layout must be a VisualLayout (the family's, adapter.layouts_of(visual); "
                f"a plain rows x cols grid is VisualLayout([('grid', rows, cols)])), got {layout!r}"
            )
        n = embeds.shape[0]
        if layout.num_tokens != n:
            raise ValueError(
                f"{type(self).__name__}: the layout {layout.segments} (frames={layout.frames}) holds "
                f"{layout.num_tokens} visual tokens, which does not hold the {n} visual rows given"
            )
        if self.hidden_size is not None and embeds.shape[1] != self.hidden_size:
            raise ValueError(
                f"{type(self).__name__} was built for hidden size {self.hidden_size}, "
                f"got rows of width {embeds.shape[1]}"
            )
        if question is not None and (question.dim() != 2 or question.shape[1] != features.shape[1]):
            raise ValueError(
                f"{type(self).__name__}: question must be [Q, {features.shape[1]}], got {tuple(question.shape)}"
            )

    def _compress(self, embeds, features, layout, question) -> CompressedVisual:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_output_tokens(self, layout: VisualLayout) -> int:  # pragma: no cover - abstract
        """How many visual rows the drafter sees for a visual laid out as ``layout``."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """Plain dict that :func:`build_compressor` turns back into an equivalent module."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        cfg = {k: v for k, v in self.config_dict().items() if k not in ("type", "branches")}
        return ", ".join(f"{k}={v}" for k, v in cfg.items())


# ------------------------------------------------------------------------------------------------- primitives
class PruneCompressor(Compressor):
    """Keep ``ceil(N / ratio)`` of the N visual rows, in their original order, same indices in both streams.

    Training: a uniformly random subset (``torch`` global RNG), as in SpecVLM. Eval: deterministic, evenly spaced
    rows ``floor((2i + 1) * N / (2M))`` (the centre of each of M equal slices), so inference is reproducible.
    """

    type_name = "prune"

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = _check_ratio(ratio, "prune")

    def num_output_tokens(self, layout: VisualLayout) -> int:
        return self._kept(layout.num_tokens)

    def _kept(self, n: int) -> int:
        """How many of ``n`` rows are kept."""
        return min(n, max(1, math.ceil(Fraction(n) / Fraction(str(self.ratio)))))

    def keep_indices(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """Sorted row indices to keep out of ``n`` (random in training, evenly spaced in eval)."""
        m = self._kept(n)
        if self.training:
            return torch.randperm(n, device=device)[:m].sort().values
        return (torch.arange(m, device=device) * 2 + 1) * n // (2 * m)

    def _compress(self, embeds, features, layout, question):
        idx = self.keep_indices(embeds.shape[0], embeds.device)
        return CompressedVisual(embeds.index_select(0, idx), features.index_select(0, idx))

    def config_dict(self):
        return {"type": "prune", "ratio": self.ratio}


class PoolCompressor(Compressor):
    """Average pooling over each 2D patch grid, window = stride = :func:`kernel_for_ratio` (ceil mode).

    Pooling is per channel, so pooling the concatenated ``[N, 2H]`` rows is the same as pooling each stream: output
    row m of both streams is the mean of the same grid window. Edge windows of a non-divisible grid average only the
    patches that exist. Each grid piece of the layout is pooled on its own (a window never spans two pieces);
    tokens outside the pieces (newlines, CLS) are dropped.
    """

    type_name = "pool"

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = _check_ratio(ratio, "pool")
        self.kernel = kernel_for_ratio(self.ratio)

    def num_output_tokens(self, layout: VisualLayout) -> int:
        return _windowed_output_tokens(layout, self.kernel)

    def _compress(self, embeds, features, layout, question):
        h = embeds.shape[1]
        rows = torch.cat([embeds, features], dim=1)
        pooled = _per_grid(rows, layout, lambda fmap: F.avg_pool2d(fmap, self.kernel, self.kernel, ceil_mode=True))
        e, f = _split(pooled, h)
        return CompressedVisual(e, f)

    def config_dict(self):
        return {"type": "pool", "ratio": self.ratio}


class ConvCompressor(Compressor):
    """Learned strided convolution over the patch grid (kernel = stride = :func:`kernel_for_ratio`).

    One grouped ``Conv2d(2H, 2H, groups=2)``: an independent ``H -> H`` conv per stream, computed in one call. A
    full ``2H -> 2H`` conv would let the embedding output depend on target features (and vice versa) and costs
    twice the parameters; the drafter's ``fc`` mixes the streams anyway. The weights are initialised to average
    pooling (``w[o, i] = [o == i] / (kh * kw)``, bias 0): at step 0 the conv equals :class:`PoolCompressor`, a sane
    starting point. Grids that are not a multiple of the kernel are edge-replicate padded (ceil-mode behaviour: no
    patch is dropped and the same ``M`` as pooling). Like pooling, each grid piece of the layout is convolved on its
    own and tokens outside the pieces are dropped.
    """

    type_name = "conv"

    def __init__(self, ratio: float, hidden_size: int):
        super().__init__()
        self.ratio = _check_ratio(ratio, "conv")
        self.hidden_size = _check_positive_int(hidden_size, "hidden_size", "conv")
        self.kernel = kernel_for_ratio(self.ratio)
        h = self.hidden_size
        self.conv = nn.Conv2d(2 * h, 2 * h, self.kernel, stride=self.kernel, groups=2, bias=True)
        self._reset_compressor_parameters()

    @torch.no_grad()
    def _reset_compressor_parameters(self) -> None:
        # hf_init.* skip tensors flagged as loaded from a checkpoint, so this is safe inside from_pretrained.
        w = self.conv.weight
        kh, kw = self.kernel
        init = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
        out = torch.arange(w.shape[0], device=w.device)
        init[out, out % self.hidden_size] = 1.0 / (kh * kw)
        hf_init.copy_(w, init)
        hf_init.zeros_(self.conv.bias)

    def num_output_tokens(self, layout: VisualLayout) -> int:
        return _windowed_output_tokens(layout, self.kernel)

    def _conv_maps(self, fmap: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel
        pad_h, pad_w = (-fmap.shape[2]) % kh, (-fmap.shape[3]) % kw
        if pad_h or pad_w:
            fmap = F.pad(fmap, (0, pad_w, 0, pad_h), mode="replicate")
        return self.conv(fmap)

    def _compress(self, embeds, features, layout, question):
        h, dtype = embeds.shape[1], embeds.dtype
        rows = torch.cat([embeds, features], dim=1).to(self.conv.weight.dtype)
        e, f = _split(_per_grid(rows, layout, self._conv_maps).to(dtype), h)
        return CompressedVisual(e, f)

    def config_dict(self):
        return {"type": "conv", "ratio": self.ratio}


class ResamplerCompressor(Compressor):
    """Simplified Q-Former: ``num_queries`` learned queries, one cross-attention layer over the N visual rows.

    Keys/values are the two streams, each RMS-normalised (their scales differ wildly), concatenated to ``2H``.
    ``nn.MultiheadAttention(H, num_heads, kdim=2H, vdim=2H)`` runs the attention; the output row is

        out_m = sum_j a_mj * [e_j, f_j]  +  up(attn_m)

    where ``a`` are the head-averaged attention weights and ``up: H -> 2H`` is zero-initialised. The first term is a
    convex combination of *real* rows with the same weights for both streams (so embeds/features stay aligned and
    in-distribution for the drafter from step 0); the second is a learned residual correction. Parameters: about
    ``8 H^2`` (q, out ``H x H``; k, v, up ``H x 2H``).
    """

    type_name = "resampler"

    def __init__(self, num_queries: int, hidden_size: int, num_heads: int | None = None):
        super().__init__()
        self.num_queries = _check_positive_int(num_queries, "num_queries", "resampler")
        self.hidden_size = h = _check_positive_int(hidden_size, "hidden_size", "resampler")
        self.num_heads = _default_heads(h) if num_heads is None else _check_heads(num_heads, h)
        self.norm_embeds = nn.RMSNorm(h, eps=1e-6)
        self.norm_features = nn.RMSNorm(h, eps=1e-6)
        self.queries = nn.Parameter(torch.empty(self.num_queries, h))
        self.attn = nn.MultiheadAttention(h, self.num_heads, kdim=2 * h, vdim=2 * h, batch_first=True)
        self.up = nn.Linear(h, 2 * h)
        self._reset_compressor_parameters()

    @torch.no_grad()
    def _reset_compressor_parameters(self) -> None:
        hf_init.normal_(self.queries, std=0.02)
        hf_init.zeros_(self.up.weight)
        hf_init.zeros_(self.up.bias)

    def num_output_tokens(self, layout: VisualLayout) -> int:
        return self.num_queries

    def _compress(self, embeds, features, layout, question):
        dtype = embeds.dtype
        pdtype = self.queries.dtype
        rows = torch.cat([embeds, features], dim=1).to(pdtype)
        kv = torch.cat([self.norm_embeds(embeds.to(pdtype)), self.norm_features(features.to(pdtype))], dim=1)
        attn_out, weights = self.attn(
            self.queries[None], kv[None], kv[None], need_weights=True, average_attn_weights=True
        )
        out = weights[0] @ rows + self.up(attn_out[0])
        e, f = _split(out.to(dtype), self.hidden_size)
        return CompressedVisual(e, f)

    def config_dict(self):
        return {"type": "resampler", "num_queries": self.num_queries, "num_heads": self.num_heads}


class TextOnlyCompressor(Compressor):
    """Drop every visual row (M = 0): for questions that need no visual evidence."""

    type_name = "text_only"

    def num_output_tokens(self, layout: VisualLayout) -> int:
        return 0

    def _compress(self, embeds, features, layout, question):
        return CompressedVisual(embeds[:0], features[:0])

    def config_dict(self):
        return {"type": "text_only"}


# ------------------------------------------------------------------------------------------------ combinators
class QuestionGate(nn.Module):
    """Question-aware gate: small MLP over ``[mean(question features), mean(visual features)]`` -> logits.

    Both inputs are target final features (the ``features`` stream and the features of the text after the image).
    Each mean is RMS-normalised first so the gate does not depend on the target's feature scale; an empty question
    (no text after the image) contributes a zero vector.
    """

    def __init__(self, hidden_size: int, num_choices: int, gate_hidden: int = DEFAULT_GATE_HIDDEN):
        super().__init__()
        self.norm_question = nn.RMSNorm(hidden_size, eps=1e-6)
        self.norm_visual = nn.RMSNorm(hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, num_choices)
        )

    def forward(self, visual_features: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        v = visual_features.to(dtype).mean(0)
        q = question.to(dtype).mean(0) if question.shape[0] > 0 else v.new_zeros(v.shape)
        return self.mlp(torch.cat([self.norm_question(q), self.norm_visual(v)])).float()


def _validate_branch_names(branches: Mapping[str, Any], kind: str) -> None:
    if not isinstance(branches, Mapping) or len(branches) == 0:
        raise ValueError(f"{kind}: 'branches' must be a non-empty mapping name -> compressor")
    for name in branches:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{kind}: branch names must be non-empty strings without '.', got {name!r}")


def _sorted_branches(branches: Mapping[str, Any]) -> dict[str, Any]:
    """Branches in their canonical order: sorted by name.

    The order is semantic (gate logit i <-> branch i; concat row order), and transformers writes config.json with
    sorted keys, so insertion order would not survive ``save_pretrained`` / ``from_pretrained``: after a reload the
    gate would silently drive the wrong branches. Sorting by name is the one order that always round-trips (prefix
    names, e.g. ``"0_pool"``, to choose a concat order).
    """
    return {name: branches[name] for name in sorted(branches)}


class SelectCompressor(Compressor):
    """SpecVLM's default: a question-aware gate picks ONE branch per input.

    Training: ``gumbel_softmax(logits, tau, hard=True)`` -> one-hot ``y`` with a straight-through gradient; only the
    chosen branch ``k`` runs. The gate gets its gradient through the chosen rows, which are written as

        rows' = anchor + y_k * (rows - anchor),   anchor = mean of the N input rows (per stream)

    ``y_k`` is 1.0 in value, so ``rows' == rows``; its gradient is ``<dL/drows', rows - anchor>``, i.e. "does this
    branch's output help more than a blank average image?". Plainly scaling ``rows * y_k`` would give the gate
    (almost) no gradient through the drafter, because the drafter's per-row input RMSNorm removes any row scale.
    When text-only (M = 0) is chosen the loss cannot reach the gate; ``gate_probs`` is returned for auxiliary losses.

    Eval: ``argmax(logits)`` (deterministic). ``branch`` is the chosen index into :attr:`branch_names`;
    ``gate_probs`` = ``softmax(logits)`` (noise-free, sums to 1). Branches are kept sorted by name (see
    ``_sorted_branches``: the only order that survives a config.json round trip).
    """

    type_name = "select"

    def __init__(
        self,
        branches: Mapping[str, Compressor],
        hidden_size: int,
        tau: float = DEFAULT_TAU,
        gate_hidden: int = DEFAULT_GATE_HIDDEN,
    ):
        super().__init__()
        _validate_branch_names(branches, "select")
        self.hidden_size = _check_positive_int(hidden_size, "hidden_size", "select")
        self.tau = _check_tau(tau)
        self.gate_hidden = _check_positive_int(gate_hidden, "gate_hidden", "select")
        self.branches = nn.ModuleDict(_sorted_branches(branches))
        self.gate = QuestionGate(self.hidden_size, len(self.branches), self.gate_hidden)

    @property
    def branch_names(self) -> list[str]:
        return list(self.branches.keys())

    def _branch_index(self, branch: int | str) -> int:
        if isinstance(branch, str):
            if branch not in self.branches:
                raise KeyError(f"unknown branch {branch!r}; branches: {self.branch_names}")
            return self.branch_names.index(branch)
        return int(branch)

    def branch_output_tokens(self, layout: VisualLayout) -> dict[str, int]:
        return {name: b.num_output_tokens(layout) for name, b in self.branches.items()}

    def num_output_tokens(self, layout: VisualLayout, branch: int | str | None = None) -> int:
        """Rows produced by ``branch`` (index or name); without one, the maximum over branches (an upper bound: the
        gate's choice depends on the question)."""
        counts = list(self.branch_output_tokens(layout).values())
        return max(counts) if branch is None else counts[self._branch_index(branch)]

    def _compress(self, embeds, features, layout, question):
        logits = self.gate(features, question)
        probs = logits.softmax(-1)
        branches = list(self.branches.values())
        if not self.training:
            k = int(logits.argmax())
            out = branches[k](embeds, features, layout, question)
            return CompressedVisual(out.embeds, out.features, branch=k, gate_probs=probs)
        y = F.gumbel_softmax(logits, tau=self.tau, hard=True)
        k = int(y.argmax())
        out = branches[k](embeds, features, layout, question)
        e, f = out.embeds, out.features
        if e.shape[0] > 0:
            w = y[k].to(e.dtype)
            anchor_e, anchor_f = embeds.mean(0, keepdim=True), features.mean(0, keepdim=True)
            e = anchor_e + w * (e - anchor_e)
            f = anchor_f + w * (f - anchor_f)
        return CompressedVisual(e, f, branch=k, gate_probs=probs)

    def config_dict(self):
        return {
            "type": "select",
            "tau": self.tau,
            "gate_hidden": self.gate_hidden,
            "branches": {name: b.config_dict() for name, b in self.branches.items()},
        }


class WeightedCompressor(Compressor):
    """Question-gated soft fusion of prune / pool / conv at one ratio: ``out = sum_b w_b * rows_b``, w = softmax.

    The three branches must give the same M *and* row m must describe the same image region, otherwise a per-row
    weighted sum is meaningless. So pool and conv share the window grid of :func:`kernel_for_ratio`, and the prune
    branch here is *window-aligned*: it keeps one patch per pooling window (a random one in training, the window's
    centre patch in eval), i.e. exactly the pool's M rows, grid piece by grid piece. ``gate_probs`` are the fusion
    weights (order:
    prune, pool, conv); ``branch`` is None (nothing is selected).
    """

    type_name = "weighted"
    branch_names: ClassVar[tuple[str, ...]] = ("prune", "pool", "conv")

    def __init__(self, ratio: float, hidden_size: int, gate_hidden: int = DEFAULT_GATE_HIDDEN):
        super().__init__()
        self.ratio = _check_ratio(ratio, "weighted")
        self.hidden_size = _check_positive_int(hidden_size, "hidden_size", "weighted")
        self.gate_hidden = _check_positive_int(gate_hidden, "gate_hidden", "weighted")
        self.kernel = kernel_for_ratio(self.ratio)
        self.pool = PoolCompressor(self.ratio)
        self.conv = ConvCompressor(self.ratio, self.hidden_size)
        self.gate = QuestionGate(self.hidden_size, len(self.branch_names), self.gate_hidden)

    def num_output_tokens(self, layout: VisualLayout) -> int:
        return self.pool.num_output_tokens(layout)

    def window_prune_indices(self, layout: VisualLayout, device: torch.device | None = None) -> torch.Tensor:
        """One row index (an offset into the visual's rows) per pooling window: row-major over each grid piece's
        windows, piece after piece (the pool's output order)."""
        picks = [
            piece.index.to(device)[self._piece_window_indices(piece.rows, piece.cols, device)]
            for piece in layout.pieces()
        ]
        return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=device)

    def _piece_window_indices(self, rows: int, cols: int, device: torch.device | None) -> torch.Tensor:
        """One row-major index into a ``rows x cols`` grid per pooling window (random in training, centre in eval)."""
        kh, kw = self.kernel
        r0 = torch.arange(_ceil_div(rows, kh), device=device) * kh
        c0 = torch.arange(_ceil_div(cols, kw), device=device) * kw
        hs, ws = (rows - r0).clamp(max=kh), (cols - c0).clamp(max=kw)  # window sizes (edge windows are smaller)
        if self.training:
            dr = (torch.rand(len(r0), len(c0), device=device) * hs[:, None]).long()
            dc = (torch.rand(len(r0), len(c0), device=device) * ws[None, :]).long()
        else:
            dr = ((hs - 1) // 2)[:, None].expand(len(r0), len(c0))
            dc = ((ws - 1) // 2)[None, :].expand(len(r0), len(c0))
        return ((r0[:, None] + dr) * cols + (c0[None, :] + dc)).flatten()

    def _compress(self, embeds, features, layout, question):
        w = self.gate(features, question).softmax(-1)
        idx = self.window_prune_indices(layout, embeds.device)
        outs = [
            CompressedVisual(embeds.index_select(0, idx), features.index_select(0, idx)),
            self.pool(embeds, features, layout, question),
            self.conv(embeds, features, layout, question),
        ]
        wd = w.to(embeds.dtype)
        e = sum(wd[i] * o.embeds for i, o in enumerate(outs))
        f = sum(wd[i] * o.features for i, o in enumerate(outs))
        return CompressedVisual(e, f, branch=None, gate_probs=w)

    def config_dict(self):
        return {"type": "weighted", "ratio": self.ratio, "gate_hidden": self.gate_hidden}


class ConcatCompressor(Compressor):
    """Multi-granularity: the rows of every branch, concatenated in branch-name order (M = sum of the branches' M)."""

    type_name = "concat"

    def __init__(self, branches: Mapping[str, Compressor]):
        super().__init__()
        _validate_branch_names(branches, "concat")
        self.branches = nn.ModuleDict(_sorted_branches(branches))

    def branch_output_tokens(self, layout: VisualLayout) -> dict[str, int]:
        return {name: b.num_output_tokens(layout) for name, b in self.branches.items()}

    def num_output_tokens(self, layout: VisualLayout) -> int:
        return sum(self.branch_output_tokens(layout).values())

    def _compress(self, embeds, features, layout, question):
        outs = [b(embeds, features, layout, question) for b in self.branches.values()]
        return CompressedVisual(torch.cat([o.embeds for o in outs]), torch.cat([o.features for o in outs]))

    def config_dict(self):
        return {"type": "concat", "branches": {name: b.config_dict() for name, b in self.branches.items()}}


# -------------------------------------------------------------------------------------------------- configs
def default_select_branches() -> dict[str, dict]:
    """Default select branches, picked from the paper's good operating points for our small grids.

    Paper: prune/pool 10-20x for simple or text-heavy questions, conv 3x and a 2-query resampler for detailed
    visual questions, plus text-only. Visual rows the drafter sees on 8x8 / 12x12 / 16x16 grids (64/144/256):

    ========== ============ ======== ========= =========
    branch     what         8x8      12x12     16x16
    ========== ============ ======== ========= =========
    prune10    random 10x   7        15        26
    pool9      3x3 avg      9        16        36
    conv4      2x2 conv     16       36        64
    resampler2 2 queries    2        2         2
    text_only  none         0        0         0
    ========== ============ ======== ========= =========

    Pool uses a 3x3 window (9x) rather than 10-20x: on an 8x8 grid a 4x4/4x5 window leaves only 4 rows, which
    duplicates the resampler's coarse end of the range. The paper's conv 3x has no square-window equivalent;
    :func:`kernel_for_ratio` maps 3 to 2x2 anyway, so it is written as 4x.
    """
    return {
        "prune10": {"type": "prune", "ratio": 10},
        "pool9": {"type": "pool", "ratio": 9},
        "conv4": {"type": "conv", "ratio": 4},
        "resampler2": {"type": "resampler", "num_queries": 2},
        "text_only": {"type": "text_only"},
    }


def default_concat_branches() -> dict[str, dict]:
    """The paper's multi-granularity concat: prune 20x + pool 20x + conv 3x (a 2x2 window) + a 2-query resampler."""
    return {
        "prune20": {"type": "prune", "ratio": 20},
        "pool20": {"type": "pool", "ratio": 20},
        "conv4": {"type": "conv", "ratio": 4},
        "resampler2": {"type": "resampler", "num_queries": 2},
    }


# type -> (required keys, optional keys with defaults (None = filled from hidden size / built-in default))
_SCHEMA: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "prune": (("ratio",), {}),
    "pool": (("ratio",), {}),
    "conv": (("ratio",), {}),
    "resampler": ((), {"num_queries": 2, "num_heads": None}),
    "text_only": ((), {}),
    "select": ((), {"branches": None, "tau": DEFAULT_TAU, "gate_hidden": DEFAULT_GATE_HIDDEN}),
    "weighted": ((), {"ratio": 4, "gate_hidden": DEFAULT_GATE_HIDDEN}),
    "concat": ((), {"branches": None}),
}
COMPRESSOR_TYPES: tuple[str, ...] = tuple(sorted(_SCHEMA))


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_ratio(ratio: Any, kind: str) -> int | float:
    if not _is_number(ratio) or not math.isfinite(float(ratio)) or ratio < 1:
        raise ValueError(f"{kind}: 'ratio' must be a number >= 1 (e.g. 2, 4, 9, 10, 20), got {ratio!r}")
    return int(ratio) if isinstance(ratio, numbers.Integral) else float(ratio)


def _check_positive_int(x: Any, key: str, kind: str) -> int:
    if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < 1:
        raise ValueError(f"{kind}: '{key}' must be an integer >= 1, got {x!r}")
    return int(x)


def _check_tau(tau: Any) -> float:
    if not _is_number(tau) or not math.isfinite(float(tau)) or tau <= 0:
        raise ValueError(f"select: 'tau' (Gumbel-Softmax temperature) must be a number > 0, got {tau!r}")
    return float(tau)


def _check_heads(num_heads: Any, hidden_size: int | None) -> int:
    heads = _check_positive_int(num_heads, "num_heads", "resampler")
    if hidden_size is not None and hidden_size % heads:
        raise ValueError(f"resampler: num_heads={heads} does not divide hidden size {hidden_size}")
    return heads


def _default_heads(hidden_size: int) -> int:
    return next(h for h in (8, 4, 2, 1) if hidden_size % h == 0)


def normalize_compressor_config(cfg: Mapping[str, Any] | None, hidden_size: int | None = None) -> dict | None:
    """Validate ``cfg`` strictly and return a canonical, JSON-serialisable copy with defaults filled in.

    Raises ``ValueError`` naming the valid choices for an unknown type, unknown keys or bad values. ``hidden_size``
    (when given) lets hidden-size dependent defaults be filled (resampler ``num_heads``) and checked.
    """
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise ValueError(
            f"compressor config must be a mapping like {{'type': 'prune', 'ratio': 4}} or None, got {cfg!r}"
        )
    kind = cfg.get("type")
    if kind not in _SCHEMA:
        raise ValueError(f"unknown compressor type {kind!r}; valid types: {', '.join(COMPRESSOR_TYPES)}")
    required, optional = _SCHEMA[kind]
    allowed = {"type", *required, *optional}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(
            f"{kind}: unknown key(s) {unknown}; valid keys for type {kind!r}: {', '.join(sorted(allowed))}"
        )
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"{kind}: missing required key(s) {missing}; e.g. {{'type': '{kind}', 'ratio': 4}}")
    out: dict[str, Any] = {"type": kind}
    for key in required:
        out[key] = copy.deepcopy(cfg[key])
    for key, default in optional.items():
        out[key] = copy.deepcopy(cfg[key]) if cfg.get(key) is not None else copy.deepcopy(default)

    if "ratio" in out:
        out["ratio"] = _check_ratio(out["ratio"], kind)
    if "gate_hidden" in out:
        out["gate_hidden"] = _check_positive_int(out["gate_hidden"], "gate_hidden", kind)
    if kind == "resampler":
        out["num_queries"] = _check_positive_int(out["num_queries"], "num_queries", kind)
        if out["num_heads"] is not None:
            out["num_heads"] = _check_heads(out["num_heads"], hidden_size)
        elif hidden_size is not None:
            out["num_heads"] = _default_heads(int(hidden_size))
        else:
            del out["num_heads"]  # filled in when the hidden size is known
    if kind == "select":
        out["tau"] = _check_tau(out["tau"])
    if kind in ("select", "concat"):
        branches = out["branches"]
        if "branches" not in cfg or cfg["branches"] is None:
            branches = default_select_branches() if kind == "select" else default_concat_branches()
        _validate_branch_names(branches, kind)
        out["branches"] = {
            name: normalize_compressor_config(b, hidden_size) for name, b in _sorted_branches(branches).items()
        }
        if any(b is None for b in out["branches"].values()):
            raise ValueError(f"{kind}: a branch config cannot be None (use {{'type': 'text_only'}} to drop all rows)")
    return out


def build_compressor(cfg: Mapping[str, Any] | None, hidden_size: int) -> Compressor | None:
    """Build a compressor from a plain dict (``None`` -> ``None``: the EagleVLM baseline keeps every visual row).

    Examples: ``{"type": "prune", "ratio": 4}``, ``{"type": "resampler", "num_queries": 2}``,
    ``{"type": "select"}`` (default branches, see :func:`default_select_branches`),
    ``{"type": "select", "tau": 1.0, "branches": {"p": {"type": "prune", "ratio": 10}, "t": {"type": "text_only"}}}``.
    """
    cfg = normalize_compressor_config(cfg, hidden_size)
    if cfg is None:
        return None
    return _build(cfg, int(hidden_size))


def _build(cfg: dict, h: int) -> Compressor:
    kind = cfg["type"]
    if kind == "prune":
        return PruneCompressor(cfg["ratio"])
    if kind == "pool":
        return PoolCompressor(cfg["ratio"])
    if kind == "conv":
        return ConvCompressor(cfg["ratio"], h)
    if kind == "resampler":
        return ResamplerCompressor(cfg["num_queries"], h, cfg["num_heads"])
    if kind == "text_only":
        return TextOnlyCompressor()
    if kind == "weighted":
        return WeightedCompressor(cfg["ratio"], h, cfg["gate_hidden"])
    branches = {name: _build(b, h) for name, b in cfg["branches"].items()}
    if kind == "select":
        return SelectCompressor(branches, h, tau=cfg["tau"], gate_hidden=cfg["gate_hidden"])
    return ConcatCompressor(branches)


def compressor_config_dict(compressor: Compressor | None) -> dict | None:
    """The plain-dict config of a built compressor (``None`` for no compressor); inverse of :func:`build_compressor`."""
    return None if compressor is None else compressor.config_dict()
