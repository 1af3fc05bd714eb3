"""Tests for :mod:`specvlm_lit.drafter.compressor` (tiny hidden sizes; each test well under a second)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from specvlm_lit.drafter.compressor import (
    COMPRESSOR_TYPES,
    ConcatCompressor,
    ConvCompressor,
    PoolCompressor,
    PruneCompressor,
    ResamplerCompressor,
    SelectCompressor,
    TextOnlyCompressor,
    WeightedCompressor,
    build_compressor,
    compressor_config_dict,
    default_select_branches,
    kernel_for_ratio,
    normalize_compressor_config,
)
from specvlm_lit.drafter.sequence import CompressedVisual
from specvlm_lit.targets import VisualLayout

torch.set_num_threads(1)

H = 8
GRIDS = [(8, 8), (12, 12), (16, 16), (5, 7)]  # the embedded target's grids + a non-divisible one


def layout(grid) -> VisualLayout:
    """A plain ``rows x cols`` patch grid (LLaVA-1.5's layout)."""
    return VisualLayout([("grid", *grid)])


def rows(grid, h=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    return torch.randn(n, h, generator=g), 10 * torch.randn(n, h, generator=g)


def question(q=3, h=H, seed=1):
    return torch.randn(q, h, generator=torch.Generator().manual_seed(seed))


def all_configs() -> dict[str, dict]:
    return {
        "prune": {"type": "prune", "ratio": 4},
        "pool": {"type": "pool", "ratio": 4},
        "conv": {"type": "conv", "ratio": 9},
        "resampler": {"type": "resampler", "num_queries": 2, "num_heads": 2},
        "text_only": {"type": "text_only"},
        "select": {"type": "select"},
        "weighted": {"type": "weighted", "ratio": 4},
        "concat": {"type": "concat"},
    }


# ------------------------------------------------------------------------------------------- output sizes
def test_kernel_mapping():
    expected = {
        1: (1, 1),
        2: (1, 2),
        3: (2, 2),
        4: (2, 2),
        5: (2, 3),
        6: (2, 3),
        9: (3, 3),
        10: (3, 3),
        16: (4, 4),
        20: (4, 5),
        2.5: (1, 2),
    }
    assert {r: kernel_for_ratio(r) for r in expected} == expected


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 10, 20])
def test_prune_output_size(grid, ratio):
    n = grid[0] * grid[1]
    c = PruneCompressor(ratio).eval()
    e, f = rows(grid)
    out = c(e, f, layout(grid), question())
    assert isinstance(out, CompressedVisual)
    assert out.embeds.shape == out.features.shape == (math.ceil(n / ratio), H)
    assert c.num_output_tokens(layout(grid)) == math.ceil(n / ratio)
    assert out.branch is None and out.gate_probs is None


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [2, 4, 9, 10, 20])
@pytest.mark.parametrize("cls", [PoolCompressor, ConvCompressor])
def test_pool_and_conv_output_size(grid, ratio, cls):
    c = (cls(ratio) if cls is PoolCompressor else cls(ratio, H)).eval()
    kh, kw = kernel_for_ratio(ratio)
    m = math.ceil(grid[0] / kh) * math.ceil(grid[1] / kw)  # ceil mode: border patches are kept
    e, f = rows(grid)
    out = c(e, f, layout(grid), question())
    assert out.embeds.shape == out.features.shape == (m, H)
    assert c.num_output_tokens(layout(grid)) == m


def test_known_sizes_on_target_grids():
    # The documented table of the default select branches.
    sel = build_compressor({"type": "select"}, H)
    assert sel.branch_output_tokens(layout((8, 8))) == {
        "prune10": 7,
        "pool9": 9,
        "conv4": 16,
        "resampler2": 2,
        "text_only": 0,
    }
    assert sel.branch_output_tokens(layout((12, 12))) == {
        "prune10": 15,
        "pool9": 16,
        "conv4": 36,
        "resampler2": 2,
        "text_only": 0,
    }
    assert sel.branch_output_tokens(layout((16, 16))) == {
        "prune10": 26,
        "pool9": 36,
        "conv4": 64,
        "resampler2": 2,
        "text_only": 0,
    }
    assert sel.num_output_tokens(layout((16, 16))) == 64 and sel.num_output_tokens(layout((16, 16)), "pool9") == 36


@pytest.mark.parametrize("num_queries", [1, 2, 4])
def test_resampler_output_size(num_queries):
    c = ResamplerCompressor(num_queries, H, num_heads=2).eval()
    for grid in GRIDS:
        e, f = rows(grid)
        out = c(e, f, layout(grid), question())
        assert out.embeds.shape == out.features.shape == (num_queries, H)
        assert c.num_output_tokens(layout(grid)) == num_queries


def test_text_only_returns_zero_rows():
    e, f = rows((8, 8))
    out = TextOnlyCompressor()(e, f, layout((8, 8)), question())
    assert out.embeds.shape == out.features.shape == (0, H)
    assert TextOnlyCompressor().num_output_tokens(layout((8, 8))) == 0


def test_concat_m_is_sum():
    branches = {
        "p": PruneCompressor(20),
        "q": PoolCompressor(20),
        "c": ConvCompressor(4, H),
        "r": ResamplerCompressor(2, H),
    }
    c = ConcatCompressor(branches).eval()
    for grid in GRIDS:
        e, f = rows(grid)
        out = c(e, f, layout(grid), question())
        expected = sum(b.num_output_tokens(layout(grid)) for b in branches.values())
        assert out.embeds.shape[0] == out.features.shape[0] == expected == c.num_output_tokens(layout(grid))
    # rows are the branches' rows in branch-name order
    assert list(c.branches) == ["c", "p", "q", "r"]
    e, f = rows((8, 8))
    out = c(e, f, layout((8, 8)), question())
    first = branches["c"](e, f, layout((8, 8)), question())
    torch.testing.assert_close(out.embeds[: first.embeds.shape[0]], first.embeds)


# ------------------------------------------------------------------------------------------------- prune
def test_prune_eval_is_deterministic_and_evenly_spaced():
    c = PruneCompressor(4).eval()
    e, f = rows((8, 8))
    a, b = c(e, f, layout((8, 8)), question()), c(e, f, layout((8, 8)), question())
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.features, b.features)
    idx = c.keep_indices(64)
    assert idx.tolist() == list(range(2, 64, 4))  # centre of each slice of 4
    torch.testing.assert_close(a.embeds, e[idx])
    # ratio 1 keeps everything in order
    assert PruneCompressor(1).eval().keep_indices(10).tolist() == list(range(10))


def test_prune_train_is_random_sorted_and_seeded():
    c = PruneCompressor(4).train()
    draws = [tuple(c.keep_indices(64).tolist()) for _ in range(5)]
    assert len(set(draws)) > 1
    for d in draws:
        assert list(d) == sorted(d) and len(set(d)) == 16
    torch.manual_seed(3)
    x = c.keep_indices(64)
    torch.manual_seed(3)
    assert torch.equal(x, c.keep_indices(64))


def test_prune_keeps_same_indices_in_both_streams():
    c = PruneCompressor(3).train()
    n = 64
    e = torch.arange(n, dtype=torch.float)[:, None].expand(n, H).clone()
    f = 1000 + e
    out = c(e, f, layout((8, 8)), question())
    torch.testing.assert_close(out.features, 1000 + out.embeds)
    kept = out.embeds[:, 0]
    assert torch.all(kept[1:] > kept[:-1])  # original order


# ------------------------------------------------------------------------------------------ pool / conv
def test_pool_averages_grid_windows_with_partial_edges():
    grid = (5, 7)
    e, f = rows(grid)
    out = PoolCompressor(4)(e, f, layout(grid), question())  # 2x2 windows -> 3 x 4
    emap = e.view(5, 7, H)
    torch.testing.assert_close(out.embeds[0], emap[0:2, 0:2].reshape(-1, H).mean(0))
    torch.testing.assert_close(out.embeds[5], emap[2:4, 2:4].reshape(-1, H).mean(0))  # window (1, 1)
    torch.testing.assert_close(out.embeds[-1], emap[4:5, 6:7].reshape(-1, H).mean(0))  # 1x1 corner window
    fmap = f.view(5, 7, H)
    torch.testing.assert_close(out.features[3], fmap[0:2, 6:7].reshape(-1, H).mean(0))


@pytest.mark.parametrize("ratio", [4, 9])
def test_conv_initialised_as_average_pooling(ratio):
    grid = (12, 12)
    e, f = rows(grid)
    conv = ConvCompressor(ratio, H)(e, f, layout(grid), question())
    pool = PoolCompressor(ratio)(e, f, layout(grid), question())
    torch.testing.assert_close(conv.embeds, pool.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv.features, pool.features, atol=1e-4, rtol=1e-5)


def test_conv_streams_do_not_mix():
    c = ConvCompressor(4, H)
    with torch.no_grad():
        c.conv.weight.normal_()
    e, f = rows((8, 8))
    a = c(e, f, layout((8, 8)), question())
    b = c(e, f * 5 + 3, layout((8, 8)), question())
    torch.testing.assert_close(a.embeds, b.embeds)  # embedding half never sees features


# ---------------------------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("name", sorted(all_configs()))
@pytest.mark.parametrize("training", [False, True])
def test_streams_stay_aligned(name, training):
    """features = -embeds in -> features = -embeds out: every compressor applies the same reduction to both
    streams (learned ones at their initialisation)."""
    torch.manual_seed(0)
    c = build_compressor(all_configs()[name], H).train(training)
    for grid in [(8, 8), (5, 7)]:
        e, _ = rows(grid)
        out = c(e, -e, layout(grid), question())
        torch.testing.assert_close(out.features, -out.embeds, atol=1e-5, rtol=1e-5)


def test_input_validation():
    c = PoolCompressor(4)
    e, f = rows((8, 8))
    with pytest.raises(ValueError, match="does not hold"):
        c(e, f, layout((8, 7)), question())
    with pytest.raises(ValueError, match="aligned"):
        c(e, f[:-1], layout((8, 8)), question())
    with pytest.raises(ValueError, match="hidden size"):
        ConvCompressor(4, H + 1)(e, f, layout((8, 8)), question())
    # question may be empty or omitted
    assert c(e, f, layout((8, 8))).embeds.shape == (16, H)
    assert c(e, f, layout((8, 8)), question(0)).embeds.shape == (16, H)


# ------------------------------------------------------------------------------------------------- select
def _select(tau=1.0):
    branches = {"prune": PruneCompressor(10), "pool": PoolCompressor(4), "text": TextOnlyCompressor()}
    sel = SelectCompressor(branches, H, tau=tau)
    assert sel.branch_names == ["pool", "prune", "text"]  # canonical order: sorted by name
    return sel


def _force(sel, name, logit=50.0):
    """Bias the gate so that it (almost) always picks ``name``; returns its index."""
    k = sel.branch_names.index(name)
    bias = torch.zeros(len(sel.branch_names))
    bias[k] = logit
    with torch.no_grad():
        sel.gate.mlp[-1].bias.copy_(bias)
    return k


def test_select_eval_picks_argmax_deterministically():
    torch.manual_seed(0)
    c = _select().eval()
    e, f = rows((8, 8))
    q = question()
    a, b = c(e, f, layout((8, 8)), q), c(e, f, layout((8, 8)), q)
    assert a.branch == b.branch and torch.equal(a.embeds, b.embeds)
    assert a.branch == int(c.gate(f, q).argmax())
    torch.testing.assert_close(a.gate_probs.sum(), torch.tensor(1.0))
    # force the pool branch: output == that branch's output
    k = _force(c, "pool")
    out = c(e, f, layout((8, 8)), q)
    assert out.branch == k and c.branch_names[out.branch] == "pool"
    ref = PoolCompressor(4)(e, f, layout((8, 8)), q)
    torch.testing.assert_close(out.embeds, ref.embeds)
    torch.testing.assert_close(out.features, ref.features)
    assert out.gate_probs[k] > 0.99


def test_select_gate_depends_on_question():
    torch.manual_seed(0)
    c = _select().eval()
    e, f = rows((8, 8))
    p1 = c(e, f, layout((8, 8)), question(seed=1)).gate_probs
    p2 = c(e, f, layout((8, 8)), question(seed=2)).gate_probs
    assert not torch.allclose(p1, p2)


def test_select_training_samples_branches_and_passes_gradient_to_gate():
    torch.manual_seed(0)
    c = _select().train()
    e, f = rows((8, 8))
    q = question()
    chosen = {c(e, f, layout((8, 8)), q).branch for _ in range(40)}
    assert len(chosen) > 1  # Gumbel sampling explores
    k = _force(c, "pool")
    out = c(e, f, layout((8, 8)), q)
    assert out.branch == k
    ref = PoolCompressor(4)(e, f, layout((8, 8)), q)
    torch.testing.assert_close(out.embeds, ref.embeds)  # straight-through weight is 1 in value
    torch.testing.assert_close(out.gate_probs.sum(), torch.tensor(1.0))
    # A loss behind a per-row RMSNorm (as in the drafter) must still reach the gate.
    norm = torch.nn.RMSNorm(H)
    target = torch.randn_like(out.features)
    loss = ((norm(out.features) - target) ** 2).mean() + ((norm(out.embeds) - target) ** 2).mean()
    loss.backward()
    grads = [p.grad for p in c.gate.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert c.gate.mlp[0].weight.grad.abs().sum() > 0


def test_select_validation():
    with pytest.raises(ValueError, match="non-empty"):
        SelectCompressor({}, H)
    with pytest.raises(ValueError, match="tau"):
        SelectCompressor({"p": PruneCompressor(2)}, H, tau=0)


# ----------------------------------------------------------------------------------------------- weighted
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [3, 4, 9])
def test_weighted_branches_share_m(grid, ratio):
    c = WeightedCompressor(ratio, H).eval()
    e, f = rows(grid)
    out = c(e, f, layout(grid), question())
    m = PoolCompressor(ratio).num_output_tokens(layout(grid))
    assert out.embeds.shape == out.features.shape == (m, H) and c.num_output_tokens(layout(grid)) == m
    assert c.window_prune_indices(layout(grid)).numel() == m
    assert ConvCompressor(ratio, H).num_output_tokens(layout(grid)) == m
    torch.testing.assert_close(out.gate_probs.sum(), torch.tensor(1.0))
    assert out.gate_probs.shape == (3,) and out.branch is None


def test_weighted_prune_is_window_aligned():
    grid = (5, 7)
    c = WeightedCompressor(4, H)
    kh, kw = c.kernel
    for training in (False, True):
        c.train(training)
        for _ in range(5):
            idx = c.window_prune_indices(layout(grid))
            r, col = idx // grid[1], idx % grid[1]
            wr, wc = torch.arange(3).repeat_interleave(4), torch.arange(4).repeat(3)
            assert torch.all(r // kh == wr) and torch.all(col // kw == wc)
    c.eval()
    assert torch.equal(c.window_prune_indices(layout(grid)), c.window_prune_indices(layout(grid)))


def test_weighted_fuses_with_gate_weights():
    torch.manual_seed(0)
    c = WeightedCompressor(4, H).eval()
    e, f = rows((8, 8))
    with torch.no_grad():
        c.gate.mlp[-1].bias.copy_(torch.tensor([0.0, 40.0, 0.0]))
    out = c(e, f, layout((8, 8)), question())
    torch.testing.assert_close(out.embeds, PoolCompressor(4)(e, f, layout((8, 8))).embeds, atol=1e-5, rtol=1e-5)
    out.features.sum().backward()
    assert c.conv.conv.weight.grad is not None and any(p.grad is not None for p in c.gate.parameters())


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"type": "nope"}, "valid types: concat, conv, pool, prune, resampler, select, text_only, weighted"),
        ({"ratio": 4}, "valid types"),
        ("prune", "mapping"),
        ({"type": "prune"}, "missing required"),
        ({"type": "prune", "ratio": 0.5}, "ratio"),
        ({"type": "pool", "ratio": 0}, "ratio"),
        ({"type": "conv", "ratio": "4"}, "ratio"),
        ({"type": "prune", "ratio": True}, "ratio"),
        ({"type": "prune", "ratio": float("inf")}, "ratio"),
        ({"type": "prune", "ratio": 4, "ratioo": 4}, "valid keys for type 'prune': ratio, type"),
        ({"type": "resampler", "num_queries": 0}, "num_queries"),
        ({"type": "resampler", "num_queries": 1.5}, "num_queries"),
        ({"type": "resampler", "num_queries": 2, "num_heads": 3}, "does not divide"),
        ({"type": "select", "tau": 0}, "tau"),
        ({"type": "select", "tau": -1.0}, "tau"),
        ({"type": "select", "branches": {}}, "non-empty"),
        ({"type": "concat", "branches": {}}, "non-empty"),
        ({"type": "select", "branches": {"a": {"type": "prune", "ratio": 0}}}, "ratio"),
        ({"type": "select", "branches": {"a.b": {"type": "text_only"}}}, "branch names"),
        ({"type": "select", "branches": {"a": None}}, "None"),
        ({"type": "weighted", "ratio": 0}, "ratio"),
        ({"type": "weighted", "gate_hidden": 0}, "gate_hidden"),
    ],
)
def test_config_validation(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_compressor(cfg, H)


def test_build_none_and_types():
    assert build_compressor(None, H) is None
    assert compressor_config_dict(None) is None
    expected = {
        "prune": PruneCompressor,
        "pool": PoolCompressor,
        "conv": ConvCompressor,
        "resampler": ResamplerCompressor,
        "text_only": TextOnlyCompressor,
        "select": SelectCompressor,
        "weighted": WeightedCompressor,
        "concat": ConcatCompressor,
    }
    assert set(expected) == set(COMPRESSOR_TYPES)
    for name, cfg in all_configs().items():
        assert type(build_compressor(cfg, H)) is expected[name]
    sel = build_compressor({"type": "select"}, H)
    assert sel.branch_names == sorted(default_select_branches())


@pytest.mark.parametrize("name", sorted(all_configs()))
def test_build_serialise_round_trip(name):
    torch.manual_seed(0)
    c1 = build_compressor(all_configs()[name], H).eval()
    for p in c1.parameters():  # move away from the deterministic init so the state dict matters
        p.data.add_(0.01 * torch.randn_like(p))
    cfg = json.loads(json.dumps(compressor_config_dict(c1)))
    assert cfg == normalize_compressor_config(all_configs()[name], H)
    if "branches" in cfg:  # the branch order (gate index <-> branch) survives a sorted-keys JSON dump
        resorted = json.loads(json.dumps(compressor_config_dict(c1), sort_keys=True))
        assert list(build_compressor(resorted, H).branches) == list(c1.branches)
    assert normalize_compressor_config(cfg, H) == cfg  # canonical form is a fixed point
    c2 = build_compressor(cfg, H).eval()
    c2.load_state_dict(c1.state_dict())
    for grid in [(8, 8), (5, 7)]:
        e, f = rows(grid)
        a, b = c1(e, f, layout(grid), question()), c2(e, f, layout(grid), question())
        torch.testing.assert_close(a.embeds, b.embeds)
        torch.testing.assert_close(a.features, b.features)
        assert a.branch == b.branch


def test_normalize_fills_defaults():
    cfg = normalize_compressor_config({"type": "resampler"}, 64)
    assert cfg == {"type": "resampler", "num_queries": 2, "num_heads": 8}
    assert "num_heads" not in normalize_compressor_config({"type": "resampler"})  # unknown hidden size
    sel = normalize_compressor_config({"type": "select"}, 64)
    assert sel["tau"] == 1.0 and set(sel["branches"]) == set(default_select_branches())
    assert normalize_compressor_config({"type": "prune", "ratio": 2.5})["ratio"] == 2.5


# ------------------------------------------------------------------------------- several images, no image
@pytest.mark.parametrize("name", sorted(all_configs()))
def test_every_compressor_compresses_each_image_on_its_own_and_skips_text_only(name):
    """build_draft_sequence with several images calls the compressor once per image (its own rows and layout) and
    splices each output where that image stood; a text-only sequence is the plain pairing, whatever the compressor."""
    from specvlm_lit.drafter.sequence import build_draft_sequence, visual_spans

    torch.manual_seed(0)
    comp = build_compressor(all_configs()[name], H).eval()
    img = 99
    grids = [(8, 8), (5, 7)]
    layouts = [layout(g) for g in grids]
    # BOS, text, image 1, text, image 2, question text: two separate runs of image tokens.
    ids = torch.tensor([1, 5, *[img] * 64, 6, 7, *[img] * 35, 8, 9, 10])
    T = ids.shape[0]
    embeds, feats = torch.randn(T, H), 10 * torch.randn(T, H)
    seq = build_draft_sequence(embeds, feats, ids, img, compressor=comp, layouts=layouts)
    (s1, n1), (s2, n2) = visual_spans(ids, img)
    assert [(s1, n1), (s2, n2)] == [(2, 64), (68, 35)]
    question = feats[s2 + n2 : T]  # the text after the last image
    e_next, f = embeds[1:], feats[:-1]
    one = comp(e_next[s1 - 1 : s1 - 1 + n1], f[s1 - 1 : s1 - 1 + n1], layout(grids[0]), question)
    two = comp(e_next[s2 - 1 : s2 - 1 + n2], f[s2 - 1 : s2 - 1 + n2], layout(grids[1]), question)
    m1, m2 = one.embeds.shape[0], two.embeds.shape[0]
    assert m1 == comp.num_output_tokens(layout(grids[0])) or name == "select"  # select: the gate's branch
    expected_e = torch.cat(
        [e_next[: s1 - 1], one.embeds, e_next[s1 - 1 + n1 : s2 - 1], two.embeds, e_next[s2 - 1 + n2 :]]
    )
    expected_f = torch.cat([f[: s1 - 1], one.features, f[s1 - 1 + n1 : s2 - 1], two.features, f[s2 - 1 + n2 :]])
    assert torch.equal(seq.embeds, expected_e) and torch.equal(seq.features, expected_f)
    assert seq.position_offset == (m1 - n1) + (m2 - n2)
    assert (seq.source == -1).sum() == m1 + m2 and len(seq.compressed_images) == 2
    kept = seq.source[seq.source >= 0]
    assert kept.tolist() == [0, *range(s1 - 1 + n1, s2 - 1), *range(s2 - 1 + n2, T - 1)]
    # Back-to-back placeholders are still two images when the layouts say so.
    ids2 = torch.tensor([1, *[img] * 64, *[img] * 35, 8, 9])
    e2, f2 = torch.randn(ids2.shape[0], H), torch.randn(ids2.shape[0], H)
    seq2 = build_draft_sequence(e2, f2, ids2, img, compressor=comp, layouts=layouts)
    assert len(seq2.compressed_images) == 2
    # No image: nothing compressed, every pair kept.
    text = torch.tensor([1, 5, 6, 7, 8])
    plain = build_draft_sequence(torch.randn(5, H), torch.randn(5, H), text, img, compressor=comp, layouts=[])
    assert plain.length == 4 and plain.position_offset == 0 and plain.compressed is None
    assert plain.source.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="layouts hold 103 visual tokens .* input_ids hold 99 visual tokens"):
        build_draft_sequence(embeds, feats, ids, img, compressor=comp, layouts=[*layouts, layout((2, 2))])
    with pytest.raises(ValueError, match="no layouts"):
        build_draft_sequence(embeds, feats, ids, img, compressor=comp)
