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
"""

from __future__ import annotations

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
    position_offset: int  # drafter position = target position + position_offset (after the image)
    compressed: CompressedVisual | None = None

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


def image_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int]:
    """(start, count) of the single contiguous run of image tokens in ``input_ids`` ([T]); (0, 0) if none."""
    pos = (input_ids == image_token_id).nonzero().flatten()
    if pos.numel() == 0:
        return 0, 0
    start, n = int(pos[0]), pos.numel()
    if int(pos[-1]) - start + 1 != n:
        raise ValueError("image tokens must form one contiguous run (one image per sample)")
    if start == 0:
        raise ValueError("the image cannot be the first token: the drafter needs the feature before it")
    return start, n


def build_draft_sequence(
    input_embeds: torch.Tensor,
    target_features: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    *,
    compressor: VisualCompressor | None = None,
    grid: tuple[int, int] | None = None,
    length: int | None = None,
    question_end: int | None = None,
) -> DraftSequence:
    """Pair and (optionally) compress one sample.

    input_embeds: [T, H] target input embeddings (visual embeddings already scattered in);
    target_features: [T, H]; input_ids: [T]; ``length`` = number of real (unpadded) tokens.
    Rows cover t = 0..length-2 (the last token has no successor to pair with).
    ``grid``: (rows, cols) the visual tokens are laid out on (``TargetAdapter.visual_grid``); when the
    caller cannot tell, they are assumed to form a square (:func:`~specvlm_lit.target.square_grid`).
    ``question_end``: end (exclusive) of the prompt text the gate may look at. Training passes the
    first answer position so the gate never sees the answer it is about to help draft; at decoding
    time the sequence *is* the prompt, so the default (``length``) is the same span.
    """
    T = int(length if length is not None else input_ids.shape[0])
    ids = input_ids[:T]
    e_next, f = input_embeds[1:T], target_features[: T - 1]
    source = torch.arange(T - 1, device=input_ids.device)
    if compressor is None:  # EagleVLM: every row kept, any number/placement of images is fine
        return DraftSequence(e_next, f, source, 0)
    s, n = image_span(ids, image_token_id)
    if n == 0:
        return DraftSequence(e_next, f, source, 0)
    # Pairs t = s-1 .. s+n-2 carry visual tokens on the embedding side.
    lo, hi = s - 1, s - 1 + n
    if grid is None:
        grid = square_grid(n)
    question = target_features[s + n : T if question_end is None else min(int(question_end), T)]
    comp = compressor(e_next[lo:hi], f[lo:hi], grid, question)
    m = comp.embeds.shape[0]
    embeds = torch.cat([e_next[:lo], comp.embeds, e_next[hi:]])
    features = torch.cat([f[:lo], comp.features, f[hi:]])
    src = torch.cat([source[:lo], torch.full((m,), -1, dtype=source.dtype, device=source.device), source[hi:]])
    return DraftSequence(embeds, features, src, m - n, comp)
