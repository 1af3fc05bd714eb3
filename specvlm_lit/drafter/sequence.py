"""How a target sequence becomes the drafter's input sequence (the one contract training and decoding share).

EAGLE pairing. The target runs over tokens x_0..x_{T-1} and yields final features f_0..f_{T-1}
(the LM-head inputs). Drafter position t consumes the pair (e_{t+1}, f_t), where e_{t+1} is the
input embedding of token t+1 (for an image token: its visual embedding), and its output predicts
f_{t+1}; ``lm_head`` of that prediction is the distribution of x_{t+2}.

Visual compression. Let the image occupy target positions [s, s+N). The N pairs whose *token* side
is visual, t = s-1 .. s+N-2, i.e. (v_j, f_{s-1+j}) for j = 0..N-1, are handed to the compressor as
aligned (embedding, feature) rows and replaced by the M rows it returns. Every other pair is kept
as is. So the drafter sees T-1-N+M pairs and, after the image, its positions run ``M - N`` behind the
target's (``position_offset``). The target always sees all N visual tokens; only the drafter's view
shrinks, so decoding stays lossless whatever the compressor does.

``compressor=None`` (EagleVLM) keeps all N visual rows.

Several images (a multi-image prompt): every image's N_i rows are compressed on their own, per image, into M_i
rows, in order; after the k-th image the drafter runs ``sum_{i<=k} (M_i - N_i)`` behind the target, and
``position_offset`` is the total after the last one. No image (a text-only sample): nothing is compressed and the
drafter sees all T-1 pairs, whatever the compressor.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..target import square_grid


@dataclass
class CompressedVisual:
    embeds: torch.Tensor  # [M, H] token-side rows
    features: torch.Tensor  # [M, H] feature-side rows
    branch: int | None = None  # index of the branch a select-gate chose (None for fixed compressors)
    gate_probs: torch.Tensor | None = None  # [num_branches] gate distribution, for logging/aux losses


class VisualCompressor(Protocol):
    def __call__(
        self, embeds: torch.Tensor, features: torch.Tensor, grid: tuple[int, int], question: torch.Tensor
    ) -> CompressedVisual:
        """Compress N aligned visual rows ([N, H] each, row-major over a ``grid`` of patches) into M rows.

        ``question`` are the target features of the text after the image ([Q, H]): the gate's
        question-aware signal. Must be deterministic in eval mode.
        """


@dataclass
class DraftSequence:
    """Drafter inputs for ONE sample (no batch dimension)."""

    embeds: torch.Tensor  # [L, H] e_{t+1} side
    features: torch.Tensor  # [L, H] f_t side
    source: torch.Tensor  # [L] long: target position t of each row, -1 for compressed visual rows
    position_offset: int  # drafter position = target position + position_offset (after the last image)
    compressed: CompressedVisual | None = None  # the first image's (its gate branch is what training logs)
    compressed_images: list[CompressedVisual] | None = None  # one per image, in order

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


def image_spans(
    input_ids: torch.Tensor, image_token_id: int, counts: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """``(start, count)`` of every image's run of image tokens in ``input_ids`` ([T]), in order; ``[]`` if none.

    ``counts`` (image tokens per image) splits the image tokens into images, so two placeholders written back to
    back (``<image><image>``) are still two images; without it every contiguous run is one image."""
    pos = (input_ids == image_token_id).nonzero().flatten().tolist()
    if counts is None:
        runs: list[list[int]] = []
        for p in pos:
            if runs and p == runs[-1][-1] + 1:
                runs[-1].append(p)
            else:
                runs.append([p])
    else:
        if sum(counts) != len(pos):
            raise ValueError(f"the images have {sum(counts)} visual tokens but input_ids hold {len(pos)} image tokens")
        bounds = [0, *itertools.accumulate(counts)]
        runs = [pos[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    spans = []
    for run in runs:
        start, n = run[0], len(run)
        if run[-1] - start + 1 != n:
            raise ValueError("each image's tokens must form one contiguous run")
        if start == 0:
            raise ValueError("an image cannot be the first token: the drafter needs the feature before it")
        spans.append((start, n))
    return spans


def image_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int]:
    """(start, count) of the single image's run of image tokens; (0, 0) if none; ValueError for several."""
    spans = image_spans(input_ids, image_token_id)
    if len(spans) > 1:
        raise ValueError(f"{len(spans)} images in the sequence; use image_spans for several")
    return spans[0] if spans else (0, 0)


Grid = tuple[int, int]


def build_draft_sequence(
    input_embeds: torch.Tensor,
    target_features: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    *,
    compressor: VisualCompressor | None = None,
    grid: Grid | Sequence[Grid | None] | None = None,
    length: int | None = None,
    question_end: int | None = None,
) -> DraftSequence:
    """Pair and (optionally) compress one sample.

    input_embeds: [T, H] target input embeddings (visual embeddings already scattered in);
    target_features: [T, H]; input_ids: [T]; ``length`` = number of real (unpadded) tokens.
    Rows cover t = 0..length-2 (the last token has no successor to pair with).
    ``grid``: (rows, cols) the visual tokens are laid out on (``TargetAdapter.visual_grid``) -- one grid, or a list
    with one per image (``[]`` for a text-only sample); where the caller cannot tell (``None``, or ``None`` in the
    list) an image's tokens are assumed to form a square (:func:`~specvlm_lit.target.square_grid`).
    ``question_end``: end (exclusive) of the prompt text the gate may look at. Training passes the
    first answer position so the gate never sees the answer it is about to help draft; at decoding
    time the sequence *is* the prompt, so the default (``length``) is the same span.

    Several images: each image's rows are compressed on their own (its own grid, its own gate decision), in order,
    and every compressor sees the same question: the text after the *last* image up to ``question_end`` (where the
    question of a multi-image prompt stands). No image: the sequence is the plain pairing, whatever the compressor.
    """
    T = int(length if length is not None else input_ids.shape[0])
    ids = input_ids[:T]
    e_next, f = input_embeds[1:T], target_features[: T - 1]
    source = torch.arange(T - 1, device=input_ids.device)
    if compressor is None:  # EagleVLM: every row kept, any number/placement of images is fine
        return DraftSequence(e_next, f, source, 0)
    if not bool((ids == image_token_id).any()):  # text only: nothing to compress
        return DraftSequence(e_next, f, source, 0)
    grids = None if grid is None else ([grid] if _is_grid(grid) else list(grid))
    if grids is not None and all(g is not None for g in grids):
        spans = image_spans(ids, image_token_id, [int(g[0]) * int(g[1]) for g in grids])
    else:
        spans = image_spans(ids, image_token_id)
        if grids is not None and len(grids) != len(spans):
            raise ValueError(f"{len(grids)} grid(s) given for {len(spans)} image(s) in the sequence")
    grids = [tuple(g) if g is not None else square_grid(n) for g, (_, n) in zip(grids or [None] * len(spans), spans)]
    last_end = spans[-1][0] + spans[-1][1]
    question = target_features[last_end : T if question_end is None else min(int(question_end), T)]
    parts_e, parts_f, parts_src, outputs = [], [], [], []
    at = 0  # next row of the plain pairing not yet taken
    for (s, n), g in zip(spans, grids):
        # Pairs t = s-1 .. s+n-2 carry this image's visual tokens on the embedding side.
        lo, hi = s - 1, s - 1 + n
        comp = compressor(e_next[lo:hi], f[lo:hi], g, question)
        m = comp.embeds.shape[0]
        parts_e += [e_next[at:lo], comp.embeds]
        parts_f += [f[at:lo], comp.features]
        parts_src += [source[at:lo], torch.full((m,), -1, dtype=source.dtype, device=source.device)]
        outputs.append(comp)
        at = hi
    embeds = torch.cat([*parts_e, e_next[at:]])
    features = torch.cat([*parts_f, f[at:]])
    src = torch.cat([*parts_src, source[at:]])
    offset = sum(c.embeds.shape[0] for c in outputs) - sum(n for _, n in spans)
    return DraftSequence(embeds, features, src, offset, outputs[0], outputs)


def _is_grid(grid) -> bool:
    """``(rows, cols)`` rather than a list of grids."""
    return len(grid) == 2 and all(hasattr(x, "__index__") for x in grid)
