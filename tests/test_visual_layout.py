"""VisualLayout as plain patch grids: the pieces grid compressors work on cover every token exactly once, in order."""

import torch

from specvlm_lit.targets import VisualLayout


def _covered(layout):
    pieces = layout.pieces()
    index = torch.cat([p.index for p in pieces] + [layout.extra_indices()])
    return pieces, index


def test_anyres_pieces_skip_the_newline_tokens():
    layout = VisualLayout([("grid", 2, 2), ("tiles", 2, 3)])  # base 2x2, then 2 rows of 3 tiles patches + newline
    pieces, index = _covered(layout)
    assert [(p.rows, p.cols) for p in pieces] == [(2, 2), (2, 3)]
    assert pieces[1].index.tolist() == [4, 5, 6, 8, 9, 10]
    assert layout.extra_indices().tolist() == [7, 11]
    assert sorted(index.tolist()) == list(range(layout.num_tokens))


def test_merged_frames_are_one_piece_each():
    layout = VisualLayout([("merged", 2, 3)], frames=3)
    pieces, index = _covered(layout)
    assert [p.index.tolist() for p in pieces] == [list(range(k * 6, k * 6 + 6)) for k in range(3)]
    assert layout.extra_indices().numel() == 0
    assert sorted(index.tolist()) == list(range(layout.num_tokens)) and layout.grid is None


def test_plain_grid():
    layout = VisualLayout([("grid", 3, 4)])
    assert layout.grid == (3, 4) and len(layout.pieces()) == 1 and layout.pieces()[0].index.tolist() == list(range(12))


def test_cls_and_single_newline_are_extras_not_grids():
    full = VisualLayout([("cls", 1, 1), ("grid", 2, 3)])  # LLaVA "full" strategy: CLS row, then the patch grid
    pieces, index = _covered(full)
    assert [(p.rows, p.cols) for p in pieces] == [(2, 3)] and pieces[0].index.tolist() == list(range(1, 7))
    assert full.extra_indices().tolist() == [0] and sorted(index.tolist()) == list(range(full.num_tokens))

    base_only = VisualLayout([("grid", 2, 2), ("newline", 1, 1)])  # LLaVA-NeXT image without tiles
    pieces, index = _covered(base_only)
    assert [(p.rows, p.cols) for p in pieces] == [(2, 2)] and base_only.extra_indices().tolist() == [4]
    assert sorted(index.tolist()) == list(range(base_only.num_tokens)) == list(range(5))
