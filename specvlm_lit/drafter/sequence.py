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

Visuals and layouts. The visual tokens are every token whose id is one of the family's ``visual_token_ids`` (the
image token, and the video token for video families); their runs are split into visuals by the family's layouts
(``adapter.layouts_of(visual)``: one :class:`~specvlm_lit.targets.VisualLayout` per run of visual tokens, in prompt
order, each ``num_tokens`` long), and each visual is compressed with its own layout. Nothing here guesses a layout:
compressing a sequence with visual tokens needs the layouts.

Several visuals (a multi-image prompt, a video, both): every visual's N_i rows are compressed on their own into
M_i rows, in order; after the k-th visual the drafter runs ``sum_{i<=k} (M_i - N_i)`` behind the target, and
``position_offset`` is the total after the last one. No visual (a text-only sample): nothing is compressed and the
drafter sees all T-1 pairs, whatever the compressor.

Positions. The drafter numbers its own rows ``0, 1, 2, ...`` (plain 1-D positions over this sequence, compressed
rows included), in training and decoding alike, whatever positions the target uses (mRoPE included).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..targets.inputs import VisualLayout


@dataclass
class CompressedVisual:
    embeds: torch.Tensor  # [M, H] token-side rows
    features: torch.Tensor  # [M, H] feature-side rows
    branch: int | None = None  # index of the branch a select-gate chose (None for fixed compressors)
    gate_probs: torch.Tensor | None = None  # [num_branches] gate distribution, for logging/aux losses


class VisualCompressor(Protocol):
    def __call__(
        self, embeds: torch.Tensor, features: torch.Tensor, layout: VisualLayout, question: torch.Tensor
    ) -> CompressedVisual:
        """Compress N aligned visual rows ([N, H] each, in the token order ``layout`` describes) into M rows.

        ``question`` are the target features of the text after the image ([Q, H]): the gate's
        question-aware signal. Must be deterministic in eval mode.
        """


@dataclass
class DraftSequence:
    """Drafter inputs for ONE sample (no batch dimension)."""

    embeds: torch.Tensor  # [L, H] e_{t+1} side
    features: torch.Tensor  # [L, H] f_t side
    source: torch.Tensor  # [L] long: target position t of each row, -1 for compressed visual rows
    position_offset: int  # drafter position = target position + position_offset (after the last visual)
    compressed: CompressedVisual | None = None  # the first visual's (its gate branch is what training logs)
    compressed_images: list[CompressedVisual] | None = None  # one per visual (image or video run), in order

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


def _ids_tuple(visual_token_ids: int | Sequence[int]) -> tuple[int, ...]:
    return (int(visual_token_ids),) if isinstance(visual_token_ids, int) else tuple(int(i) for i in visual_token_ids)


def visual_mask(input_ids: torch.Tensor, visual_token_ids: int | Sequence[int]) -> torch.Tensor:
    """``input_ids`` positions holding any of ``visual_token_ids`` (one id or several: image and video tokens)."""
    ids = torch.tensor(_ids_tuple(visual_token_ids), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, ids)


def visual_spans(
    input_ids: torch.Tensor, visual_token_ids: int | Sequence[int], counts: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """``(start, count)`` of every visual's run of visual tokens in ``input_ids`` ([T]), in order; ``[]`` if none.

    ``counts`` (visual tokens per visual, e.g. the layouts' ``num_tokens``) splits the visual tokens into visuals, so
    two placeholders written back to back (``<image><image>``) are still two visuals; without it every contiguous
    run is one visual."""
    pos = visual_mask(input_ids, visual_token_ids).nonzero().flatten().tolist()
    if counts is None:
        runs: list[list[int]] = []
        for p in pos:
            if runs and p == runs[-1][-1] + 1:
                runs[-1].append(p)
            else:
                runs.append([p])
    else:
        if sum(counts) != len(pos):
            raise ValueError(
                f"the layouts hold {sum(counts)} visual tokens ({len(counts)} visual(s): {list(counts)}) but "
                f"input_ids hold {len(pos)} visual tokens (ids {list(_ids_tuple(visual_token_ids))}): pass the "
                f"layouts of this sample's own visuals (adapter.layouts_of(visual))"
            )
        bounds = [0, *itertools.accumulate(counts)]
        runs = [pos[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    spans = []
    for run in runs:
        start, n = run[0], len(run)
        if run[-1] - start + 1 != n:
            raise ValueError("each visual's tokens must form one contiguous run (one layout per run)")
        if start == 0:
            raise ValueError("a visual cannot be the first token: the drafter needs the feature before it")
        spans.append((start, n))
    return spans


def build_draft_sequence(
    input_embeds: torch.Tensor,
    target_features: torch.Tensor,
    input_ids: torch.Tensor,
    visual_token_ids: int | Sequence[int],
    *,
    compressor: VisualCompressor | None = None,
    layouts: Sequence[VisualLayout] | None = None,
    length: int | None = None,
    question_end: int | None = None,
) -> DraftSequence:
    """Pair and (optionally) compress one sample.

    input_embeds: [T, H] target input embeddings (visual embeddings already scattered in);
    target_features: [T, H]; input_ids: [T]; ``length`` = number of real (unpadded) tokens.
    Rows cover t = 0..length-2 (the last token has no successor to pair with).
    ``visual_token_ids``: the family's visual placeholder ids (``adapter.visual_token_ids``; one int is one id).
    ``layouts``: one :class:`~specvlm_lit.targets.VisualLayout` per visual in prompt order
    (``adapter.layouts_of(visual)``; ``[]`` for a text-only sample). Required when a compressor meets visual tokens;
    their ``num_tokens`` must add up to the visual tokens of ``input_ids`` (``ValueError`` otherwise).
    ``question_end``: end (exclusive) of the prompt text the gate may look at. Training passes the
    first answer position so the gate never sees the answer it is about to help draft; at decoding
    time the sequence *is* the prompt, so the default (``length``) is the same span.

    Several visuals: each visual's rows are compressed on their own (its own layout, its own gate decision), in
    order, and every compressor sees the same question: the text after the *last* visual up to ``question_end``
    (where the question of a multi-image prompt stands). No visual: the sequence is the plain pairing, whatever the
    compressor.
    """
    T = int(length if length is not None else input_ids.shape[0])
    ids = input_ids[:T]
    e_next, f = input_embeds[1:T], target_features[: T - 1]
    source = torch.arange(T - 1, device=input_ids.device)
    if compressor is None:  # EagleVLM: every row kept, any number/placement of visuals is fine
        return DraftSequence(e_next, f, source, 0)
    layouts = None if layouts is None else list(layouts)
    if not layouts and not bool(visual_mask(ids, visual_token_ids).any()):  # text only: nothing to compress
        return DraftSequence(e_next, f, source, 0)
    if layouts is None:
        raise ValueError(
            "the sequence holds visual tokens and a compressor is given, but no layouts: pass "
            "layouts=adapter.layouts_of(visual) (one VisualLayout per visual, prompt order)"
        )
    spans = visual_spans(ids, visual_token_ids, [layout.num_tokens for layout in layouts])
    last_end = spans[-1][0] + spans[-1][1]
    question = target_features[last_end : T if question_end is None else min(int(question_end), T)]
    parts_e, parts_f, parts_src, outputs = [], [], [], []
    at = 0  # next row of the plain pairing not yet taken
    for (s, n), layout in zip(spans, [layout for layout in layouts if layout.num_tokens]):
        # Pairs t = s-1 .. s+n-2 carry this visual's tokens on the embedding side.
        lo, hi = s - 1, s - 1 + n
        comp = compressor(e_next[lo:hi], f[lo:hi], layout, question)
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
