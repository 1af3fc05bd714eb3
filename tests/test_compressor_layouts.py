"""Compressors on every visual layout (AnyRes tiles, Qwen merged patches, video frames) and the draft sequence over
image + video tokens (tiny hidden sizes; the whole file runs in a few seconds)."""

from __future__ import annotations

import pytest
import torch

from specvlm_lit.drafter.compressor import PoolCompressor, WeightedCompressor, build_compressor
from specvlm_lit.drafter.sequence import build_draft_sequence, visual_spans
from specvlm_lit.targets import VisualLayout
from tests.test_compressor import all_configs

torch.set_num_threads(1)

H = 8
LAYOUTS = {
    # LLaVA-NeXT: 4x4 base grid, then a 4x6 unpadded tile grid with one image_newline after each row (16 + 28)
    "anyres": VisualLayout([("grid", 4, 4), ("tiles", 4, 6)]),
    "anyres_base_only": VisualLayout([("grid", 4, 4), ("newline", 1, 1)]),
    "llava_cls": VisualLayout([("cls", 1, 1), ("grid", 4, 4)]),
    "qwen_merged": VisualLayout([("merged", 3, 5)]),
    "qwen_video": VisualLayout([("merged", 2, 3)], frames=4),  # 4 temporal patches of 2x3 merged tokens
    "onevision_video": VisualLayout([("merged", 3, 3), ("newline", 1, 1)], frames=3),  # frames, then one newline
}
# pool 2x2 (ceil): rows per grid piece, summed; extra tokens (newlines, CLS) dropped
POOL4_ROWS = {
    "anyres": 2 * 2 + 2 * 3,
    "anyres_base_only": 4,
    "llava_cls": 4,
    "qwen_merged": 2 * 3,
    "qwen_video": 4 * (1 * 2),
    "onevision_video": 3 * (2 * 2),
}


def _rows(layout: VisualLayout, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = layout.num_tokens
    return torch.randn(n, H, generator=g), 10 * torch.randn(n, H, generator=g)


def _question(seed: int = 1):
    return torch.randn(3, H, generator=torch.Generator().manual_seed(seed))


def _tagged_rows(layout: VisualLayout):
    """Rows whose value says where they come from: every token of grid piece p is ``p + 1`` (all channels), every
    token outside the pieces is NaN. A window that mixed two pieces would give a value between two tags; one that
    touched a newline / CLS token would give NaN."""
    e = torch.full((layout.num_tokens, H), float("nan"))
    for p, piece in enumerate(layout.pieces()):
        e[piece.index] = float(p + 1)
    return e, -e


# ------------------------------------------------------------------------------------------- output sizes
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(all_configs()))
@pytest.mark.parametrize("training", [False, True])
def test_every_compressor_gives_num_output_tokens_rows_on_every_layout(kind, name, training):
    layout = LAYOUTS[kind]
    torch.manual_seed(0)
    c = build_compressor(all_configs()[name], H).train(training)
    e, f = _rows(layout)
    out = c(e, f, layout, _question())
    expected = c.num_output_tokens(layout, out.branch) if name == "select" else c.num_output_tokens(layout)
    assert out.embeds.shape == out.features.shape == (expected, H)
    assert torch.isfinite(out.embeds).all() and torch.isfinite(out.features).all()
    # the same reduction on both streams, whatever the layout
    aligned = c(e, -e, layout, _question())
    torch.testing.assert_close(aligned.features, -aligned.embeds, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_known_counts_per_layout(kind):
    layout = LAYOUTS[kind]
    n = layout.num_tokens
    assert build_compressor({"type": "pool", "ratio": 4}, H).num_output_tokens(layout) == POOL4_ROWS[kind]
    assert build_compressor({"type": "conv", "ratio": 4}, H).num_output_tokens(layout) == POOL4_ROWS[kind]
    assert build_compressor({"type": "weighted", "ratio": 4}, H).num_output_tokens(layout) == POOL4_ROWS[kind]
    assert build_compressor({"type": "prune", "ratio": 4}, H).num_output_tokens(layout) == -(-n // 4)  # all N
    assert build_compressor({"type": "resampler", "num_queries": 2}, H).num_output_tokens(layout) == 2
    concat = build_compressor({"type": "concat"}, H)
    assert concat.num_output_tokens(layout) == sum(concat.branch_output_tokens(layout).values())


# ------------------------------------------------------------------------------------------ grid pieces
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize(
    "cfg", [{"type": "pool", "ratio": 4}, {"type": "pool", "ratio": 9}, {"type": "conv", "ratio": 4}]
)
def test_grid_compressors_never_mix_pieces_or_extra_tokens(kind, cfg):
    """Each output row comes from one grid piece only (no NaN from a newline / CLS token, no blend of two tags), and
    the pieces' rows come out in token order, as many per piece as its own window grid has."""
    layout = LAYOUTS[kind]
    c = build_compressor(cfg, H).eval()
    e, f = _tagged_rows(layout)
    out = c(e, f, layout, _question())
    assert not torch.isnan(out.embeds).any() and not torch.isnan(out.features).any()
    tags = out.embeds[:, 0]
    torch.testing.assert_close(out.embeds, tags[:, None].expand(-1, H), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features, -out.embeds, atol=1e-5, rtol=0)
    kh, kw = c.kernel
    expected = [
        float(p + 1)
        for p, piece in enumerate(layout.pieces())
        for _ in range(-(-piece.rows // kh) * -(-piece.cols // kw))
    ]
    torch.testing.assert_close(tags, torch.tensor(expected), atol=1e-5, rtol=0)


def test_pool_of_anyres_pools_base_and_tiles_as_their_own_grids():
    """Pooling an AnyRes layout == pooling its base grid and its tile grid (newlines removed) separately."""
    layout = LAYOUTS["anyres"]
    e, f = _rows(layout)
    out = PoolCompressor(4)(e, f, layout)
    base, tiles = layout.pieces()
    ref = [PoolCompressor(4)(e[p.index], f[p.index], VisualLayout([("grid", p.rows, p.cols)])) for p in (base, tiles)]
    torch.testing.assert_close(out.embeds, torch.cat([r.embeds for r in ref]))
    torch.testing.assert_close(out.features, torch.cat([r.features for r in ref]))


def test_video_frames_are_compressed_frame_by_frame():
    """A video's frames are pooled / convolved one by one (batched, same result as one call per frame)."""
    layout = LAYOUTS["qwen_video"]
    e, f = _rows(layout)
    frame = VisualLayout([("merged", 2, 3)])
    for cfg in ({"type": "pool", "ratio": 4}, {"type": "conv", "ratio": 4}):
        torch.manual_seed(0)
        c = build_compressor(cfg, H).eval()
        with torch.no_grad():
            for p in c.parameters():
                p.add_(0.1 * torch.randn_like(p))  # away from the pooling initialisation
        out = c(e, f, layout)
        ref = [c(e[k * 6 : (k + 1) * 6], f[k * 6 : (k + 1) * 6], frame) for k in range(4)]
        torch.testing.assert_close(out.embeds, torch.cat([r.embeds for r in ref]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.features, torch.cat([r.features for r in ref]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("training", [False, True])
def test_weighted_prune_picks_one_token_per_window_of_each_piece(kind, training):
    layout = LAYOUTS[kind]
    c = WeightedCompressor(4, H).train(training)
    idx = c.window_prune_indices(layout)
    e, _ = _tagged_rows(layout)
    tags = e[idx, 0]
    assert not torch.isnan(tags).any()  # never a newline / CLS token
    pooled = PoolCompressor(4)(*_tagged_rows(layout), layout).embeds[:, 0]
    assert torch.equal(tags, pooled)  # window m of the prune branch lies in the piece of the pool's window m


def test_compressor_rejects_grids_and_wrong_layouts():
    c = PoolCompressor(4)
    layout = LAYOUTS["anyres"]
    e, f = _rows(layout)
    with pytest.raises(ValueError, match="must be a VisualLayout"):
        c(e, f, (4, 11))
    with pytest.raises(ValueError, match="holds 43 visual tokens, which does not hold the 44"):
        c(e, f, VisualLayout([("grid", 4, 4), ("tiles", 3, 8)]))


# ------------------------------------------------------------------------------------------------ gates
def _count_gate_calls(compressor):
    calls = []
    compressor.gate.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("name", ["select", "weighted"])
def test_gate_decides_once_per_layout(name):
    torch.manual_seed(0)
    c = build_compressor(all_configs()[name], H).eval()
    calls = _count_gate_calls(c)
    for kind in sorted(LAYOUTS):
        e, f = _rows(LAYOUTS[kind])
        c(e, f, LAYOUTS[kind], _question())
    assert len(calls) == len(LAYOUTS)
    # In a draft sequence: once per visual (an AnyRes image, a video, a Qwen image).
    calls.clear()
    ids, layouts = _image_video_ids()
    embeds, feats = torch.randn(ids.shape[0], H), torch.randn(ids.shape[0], H)
    seq = build_draft_sequence(embeds, feats, ids, (IMG, VID), compressor=c, layouts=layouts)
    assert len(calls) == len(seq.compressed_images) == 3


# --------------------------------------------------------------------------------------------- sequence
IMG, VID = 90, 91


def _image_video_ids():
    """BOS, text, an AnyRes image, text, a video, a Qwen image right after it (no text between), question text."""
    anyres, video, merged = LAYOUTS["anyres"], LAYOUTS["qwen_video"], LAYOUTS["qwen_merged"]
    ids = [1, 5, *[IMG] * anyres.num_tokens, 6, *[VID] * video.num_tokens, *[IMG] * merged.num_tokens, 7, 8, 9]
    return torch.tensor(ids), [anyres, video, merged]


@pytest.mark.parametrize("name", sorted(all_configs()))
def test_draft_sequence_over_image_and_video_tokens(name):
    torch.manual_seed(0)
    comp = build_compressor(all_configs()[name], H).eval()
    ids, layouts = _image_video_ids()
    T = ids.shape[0]
    embeds, feats = torch.randn(T, H), 10 * torch.randn(T, H)
    seq = build_draft_sequence(embeds, feats, ids, (IMG, VID), compressor=comp, layouts=layouts)
    spans = visual_spans(ids, (IMG, VID), [layout.num_tokens for layout in layouts])
    assert spans == [(2, 44), (47, 24), (71, 15)]  # the video and the image after it are split by the layouts
    question = feats[spans[-1][0] + spans[-1][1] :]
    e_next, f = embeds[1:], feats[:-1]
    outs = [comp(e_next[s - 1 : s - 1 + n], f[s - 1 : s - 1 + n], lay, question) for (s, n), lay in zip(spans, layouts)]
    parts_e, parts_f, at = [], [], 0
    for (s, n), out in zip(spans, outs):
        parts_e += [e_next[at : s - 1], out.embeds]
        parts_f += [f[at : s - 1], out.features]
        at = s - 1 + n
    assert torch.equal(seq.embeds, torch.cat([*parts_e, e_next[at:]]))
    assert torch.equal(seq.features, torch.cat([*parts_f, f[at:]]))
    m = [o.embeds.shape[0] for o in outs]
    if name != "select":  # select: rows of the branch the gate picked
        assert m == [comp.num_output_tokens(layout) for layout in layouts]
    assert seq.position_offset == sum(m) - sum(n for _, n in spans)
    assert (seq.source == -1).sum() == sum(m)


def test_draft_sequence_qwen3_video_runs_and_mismatches():
    """Qwen3-VL: one layout per temporal patch (timestamp text between the runs); layouts that do not add up to the
    visual tokens are an error naming both counts; visual tokens without layouts are an error."""
    comp = PoolCompressor(4)
    frame = VisualLayout([("merged", 2, 3)])
    ids = torch.tensor([1, 5, 40, *[VID] * 6, 41, *[VID] * 6, 42, *[VID] * 6, 7, 8])
    T = ids.shape[0]
    embeds, feats = torch.randn(T, H), torch.randn(T, H)
    seq = build_draft_sequence(embeds, feats, ids, (IMG, VID), compressor=comp, layouts=[frame] * 3)
    assert len(seq.compressed_images) == 3 and seq.position_offset == 3 * (2 - 6)
    with pytest.raises(ValueError, match="layouts hold 12 visual tokens .* input_ids hold 18 visual tokens"):
        build_draft_sequence(embeds, feats, ids, (IMG, VID), compressor=comp, layouts=[frame] * 2)
    two_frames = VisualLayout([("merged", 2, 3)], frames=2)
    with pytest.raises(ValueError, match="one contiguous run"):  # one layout over two runs
        build_draft_sequence(embeds, feats, ids, (IMG, VID), compressor=comp, layouts=[frame, two_frames])
    with pytest.raises(ValueError, match="no layouts"):
        build_draft_sequence(embeds, feats, ids, (IMG, VID), compressor=comp)
    with pytest.raises(ValueError, match="layouts hold 6 visual tokens .* input_ids hold 0"):
        build_draft_sequence(embeds, feats, torch.tensor([1, 5, 6, 7]), (IMG, VID), compressor=comp, layouts=[frame])
    # The video id alone is not an image id: with only the image id, these tokens are text.
    plain = build_draft_sequence(embeds, feats, ids, IMG, compressor=comp, layouts=[])
    assert plain.length == T - 1 and plain.position_offset == 0


# ------------------------------------------------------------------------------------- families, decoding
@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from tests.families.build import build_family

    root = tmp_path_factory.mktemp("compressor_families")
    return {family: build_family(family, root / family) for family in ("llava_next", "llava_onevision", "qwen3_vl")}


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen3_vl"])
def test_decoding_with_a_pool_compressor_on_family_layouts(family, family_dirs):
    """Speculative decoding with a grid compressor on AnyRes images, OneVision videos (frames + newline) and Qwen3-VL
    videos (one run per temporal patch) + images: lossless, and the drafter sees exactly the rows the layouts say,
    whether the decoder takes the layouts from the pixel inputs or from ``image_layouts``."""
    from specvlm_lit.decoding.acceptance import WarpConfig
    from specvlm_lit.decoding.configs import TreeConfig
    from specvlm_lit.decoding.speculative import SpeculativeDecoder
    from specvlm_lit.drafter.eagle import EagleVLMDrafter
    from specvlm_lit.target import TargetAdapter
    from tests.families.reference import image
    from tests.test_family_video import clip, hf_generate, video_then_image

    ad = TargetAdapter.from_pretrained(family_dirs[family])
    if family == "llava_next":
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        prompt = ad.render_prompt(messages, [image(50, 40, 3)])
    else:
        messages, images = video_then_image()
        prompt = ad.render_prompt(messages, images, videos=clip(ad, seed=1))
    layouts = ad.layouts_of(prompt.visual)
    if family == "llava_next":
        assert [kind for kind, *_ in layouts[0].segments] == ["grid", "tiles"]
    torch.manual_seed(0)
    drafter = EagleVLMDrafter.for_target(ad, compressor={"type": "pool", "ratio": 4}).eval()
    dec = SpeculativeDecoder(ad, drafter, TreeConfig(3, 3, 9), WarpConfig())
    ref = hf_generate(ad, prompt, 8)
    n_visual = sum(layout.num_tokens for layout in layouts)
    drafted = sum(drafter.num_visual_tokens(layout) for layout in layouts)
    for extra in ({}, {"image_layouts": prompt.layouts}):
        res = dec.generate(prompt.input_ids, pixel_values=prompt.visual, max_new_tokens=8, **extra)
        assert res.tokens.tolist() == ref
        assert res.stats.target_visual_tokens == n_visual and res.stats.draft_visual_tokens == drafted < n_visual
