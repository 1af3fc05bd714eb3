"""Tests for :mod:`specvlm_lit.decoding.batched` (correctness only, no timing thresholds).

Every row of a batch must be token-identical to that request decoded alone by HF ``generate()``, whatever the
drafter: random (:class:`~tests.test_speculative.TinyDrafter`, a real attention layer, so wrong masks, positions
or parent features change its trees) and oracles that accept often (:class:`BatchOracle`: the target's true next
feature per row, sigma well above 2, plus a noisy one whose accepted paths run through lower-ranked siblings).
Prompts differ in length and images (some none, some two), so left padding, ragged accepts, per-row compaction and
rows leaving the batch (EOS at different rounds) are all exercised.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from specvlm_lit.decoding.acceptance import WarpConfig
from specvlm_lit.decoding.batched import BatchedSpeculativeDecoder, BatchSamplingError
from specvlm_lit.decoding.speculative import SpeculativeDecoder, TreeConfig
from tests.test_speculative import (
    MeanPoolCompressor,
    OracleDrafter,
    TinyDrafter,
    _full_mask,
    _inputs,
    get_target,
    hf_greedy,
)
from tests.test_target_adapter import make_vlm_inputs

torch.set_num_threads(1)

# (image sizes, n_text, seed) per request: different prompt lengths, no image, two images.
REQUESTS = [([(32, 32)], 5, 0), ([(16, 16)], 3, 1), ([], 6, 2), ([(32, 32), (16, 16)], 2, 3), ([(16, 16)], 9, 4)]


class BatchOracle(nn.Module):
    """:class:`~tests.test_speculative.OracleDrafter` for a batch: every cache slot stores ``(token id, request)``,
    so a row is recognised after compaction and after finished rows left the batch. Zero rows (the decoder's
    padding) map to id ``-1``; queries that are padding get a zero output."""

    def __init__(self, adapter, requests, noise: float = 0.0):
        super().__init__()
        self.oracles = [OracleDrafter(adapter, ids, feats, noise=noise) for ids, feats in requests]
        self.adapter = adapter
        self.table = adapter.embed_tokens.weight.detach()
        self.compressor = None

    def new_cache(self):
        return DynamicCache()

    def _ids(self, embeds):
        d = (embeds[:, None, :] - self.table[None]).abs().amax(-1)
        dist, idx = d.min(-1)
        zero = embeds.abs().amax(-1) == 0
        return [
            -1 if z else (int(i) if float(v) == 0.0 else self.adapter.image_token_id)
            for z, v, i in zip(zero.tolist(), dist, idx)
        ]

    def forward(self, token_embeds, features, position_ids, attention_mask=None, past_key_values=None, use_cache=False):
        b, t, h = token_embeds.shape
        cache = past_key_values
        past = cache.get_seq_length()
        ids = [self._ids(token_embeds[r]) for r in range(b)]
        req = list(range(b)) if past == 0 else cache.layers[0].keys[:, 0, 0, 1].long().tolist()
        val = torch.tensor([[[i, req[r]] for i in ids[r]] for r in range(b)], dtype=torch.float32)[:, None]
        cache.update(val, val, 0)
        all_ids = cache.layers[0].keys[:, 0, :, 0].long().tolist()
        mask = _full_mask(attention_mask, b, t, past)[:, 0] == 0  # [B, T, past + T] visible
        out = torch.zeros(b, t, h)
        for r in range(b):
            o = self.oracles[req[r]]
            rows, contexts = [], []
            for i in range(t):
                if ids[r][i] == -1:
                    continue
                seen = [all_ids[r][j] for j in mask[r, i].nonzero().flatten().tolist()]
                assert -1 not in seen, "a real row sees a padding slot"
                rows.append(i)
                contexts.append((o.prompt[0],) + tuple(seen))
            o._compute(contexts)
            for i, c in zip(rows, contexts):
                out[r, i] = o._noisy(c, o.memo[c])
        return SimpleNamespace(hidden=out, past_key_values=cache)


def _requests(adapter, which=REQUESTS):
    return [_inputs(adapter, sizes, n_text, seed) for sizes, n_text, seed in which]


def _drafter(kind, adapter, requests, compressor=None):
    if kind == "tiny":
        return TinyDrafter(adapter.hidden_size, seed=3, compressor=compressor)
    return BatchOracle(adapter, requests, noise={"oracle": 0.0, "noisy": 1.5}[kind])


class InvariantChecker:
    """After every round: cache widths match the bookkeeping, and each row's valid slots are exactly its real
    entries (target: prompt + emitted tokens except the root; drafter: its draft rows)."""

    def __init__(self, prompt_lens, draft_offsets=None):
        self.prompt_lens = prompt_lens
        self.draft_offsets = draft_offsets  # per request: draft rows - target entries (compressor: M - N)
        self.rounds = 0

    def __call__(self, event, info):
        if event != "round":
            return
        self.rounds += 1
        trows, drows = info["target_rows"], info["draft_rows"]
        assert info["target_cache"].get_seq_length() == trows.width
        assert info["draft_cache"].get_seq_length() == drows.width
        t_valid, d_valid = trows.valid().sum(1).tolist(), drows.valid().sum(1).tolist()
        for row, r in enumerate(info["requests"]):
            real = self.prompt_lens[r] + len(info["sequences"][row]) - 1
            assert t_valid[row] == int(info["target_real"][row]) == real
            assert d_valid[row] == int(info["draft_real"][row])
            if self.draft_offsets is not None:
                assert d_valid[row] == real + self.draft_offsets[r]


@pytest.mark.parametrize(
    "target,kind,shape",
    [("a", "tiny", (4, 4, 12)), ("a", "oracle", (10, 7, 60)), ("b", "noisy", (4, 4, 12)), ("b", "oracle", (3, 5, 16))],
)
def test_every_row_matches_hf_generate_alone(target, kind, shape):
    adapter = get_target(target)
    reqs = _requests(adapter)
    n = 36
    refs = [hf_greedy(adapter, ids, feats, n) for ids, feats in reqs]
    # EOS: a token that really occurs in request 0's answer, so rows stop (and leave the batch) at different rounds.
    eos = refs[0][7]
    refs_eos = [hf_greedy(adapter, ids, feats, n, eos=eos) for ids, feats in reqs]
    assert len({len(r) for r in refs_eos}) > 1
    drafter = _drafter(kind, adapter, reqs)
    checker = InvariantChecker([int(ids.shape[1]) for ids, _ in reqs], [0] * len(reqs))
    dec = BatchedSpeculativeDecoder(adapter, drafter, TreeConfig(*shape), debug_hook=checker)
    ids, feats = [r[0] for r in reqs], [r[1] for r in reqs]
    for max_new, eos_id, want in ((1, None, [r[:1] for r in refs]), (n, None, refs), (n, eos, refs_eos)):
        res = dec.generate(ids, image_features=feats, max_new_tokens=max_new, eos_token_id=eos_id)
        assert [t.tolist() for t in res.tokens] == want, (max_new, eos_id)
        assert res.stats.new_tokens == [len(w) for w in want]
        if eos_id is None and max_new == n and kind == "oracle":  # accepts often: sigma well above 2 for every row
            assert min(res.stats.sigma) > 2, res.stats.sigma
    st = res.stats
    assert st.finished_by_eos == [w[-1] == eos for w in refs_eos]
    assert checker.rounds > 0
    assert st.active_per_round[0] == len(reqs) > st.active_per_round[-1]  # finished rows dropped out


def test_trees_equal_the_batch1_decoders_trees():
    """A random drafter with a real attention layer: every row's tree in every round equals the tree the batch-1
    decoder drafts for that request, so masks, positions and parent features of the batched draft are the
    batch-1 ones. With a visual compressor (per-row draft lengths differ from the target's)."""
    adapter = get_target("a")
    which = [([(32, 32)], 5, 0), ([(16, 16)], 3, 1), ([(32, 32)], 8, 5)]
    reqs = _requests(adapter, which)
    drafter = TinyDrafter(adapter.hidden_size, seed=5, compressor=MeanPoolCompressor(4))
    tree = TreeConfig(4, 4, 12, clip_to_budget=False)
    single = []
    for ids, feats in reqs:
        trees = []
        hook = lambda e, info: trees.append(info["tree"].tokens.tolist()) if e == "tree" else None  # noqa: B023, E731
        SpeculativeDecoder(adapter, drafter, tree, debug_hook=hook).generate(ids, feats, max_new_tokens=20)
        single.append(trees)
    batched: list[list] = [[] for _ in reqs]

    def hook(event, info):
        if event == "tree":
            for row, r in enumerate(info["requests"]):
                batched[r].append(info["tokens"][row].tolist())

    offsets = []
    for _, feats in reqs:
        n_vis = sum(int(f.shape[0]) for f in feats)
        offsets.append(max(1, n_vis // 4) - n_vis)
    checker = InvariantChecker([int(ids.shape[1]) for ids, _ in reqs], offsets)
    both = lambda e, info: (hook(e, info), checker(e, info))  # noqa: E731
    dec = BatchedSpeculativeDecoder(adapter, drafter, tree, debug_hook=both)
    res = dec.generate([r[0] for r in reqs], image_features=[r[1] for r in reqs], max_new_tokens=20)
    assert [t.tolist() for t in res.tokens] == [hf_greedy(adapter, ids, f, 20) for ids, f in reqs]
    assert batched == single
    assert checker.rounds > 0


def test_pixel_values_and_batch_of_one():
    adapter = get_target("b")
    ids, images = make_vlm_inputs(adapter, [(16, 16)], n_text=4, seed=8)
    ref = hf_greedy(adapter, ids, adapter.encode_images(images), 12)
    dec = BatchedSpeculativeDecoder(adapter, TinyDrafter(seed=3), TreeConfig(4, 3, 10))
    res = dec.generate([ids], pixel_values=[torch.stack(images)], max_new_tokens=12)
    assert res.tokens[0].tolist() == ref and res.stats.batch_size == 1


def test_refuses_sampling_adaptive_and_bad_input():
    adapter = get_target("a")
    drafter = TinyDrafter(adapter.hidden_size)
    with pytest.raises(BatchSamplingError, match="greedy only"):
        BatchedSpeculativeDecoder(adapter, drafter, TreeConfig(4, 3, 10), WarpConfig(temperature=1.0))
    with pytest.raises(BatchSamplingError, match="adaptive"):
        BatchedSpeculativeDecoder(adapter, drafter, TreeConfig(4, 3, 10, adaptive=True))
    dec = BatchedSpeculativeDecoder(adapter, drafter, TreeConfig(4, 3, 10))
    with pytest.raises(ValueError, match="non-empty list"):
        dec.generate([], max_new_tokens=4)
    ids, feats = _requests(adapter, REQUESTS[:1])[0]
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate([ids], image_features=[feats], max_new_tokens=0)
    with pytest.raises(ValueError, match="visual tokens"):
        dec.generate([ids], max_new_tokens=4, image_features=[[feats[0][:3]]])


def test_growing_cache_and_per_row_compaction_keep_dynamic_cache_semantics():
    """kv_cache.growing: in-place appends give the same keys as DynamicCache's concatenation, through crop, compact
    and batch selection; compact_rows moves each row's entries to its own slots."""
    from specvlm_lit import kv_cache

    g = torch.Generator().manual_seed(0)
    plain, grow = DynamicCache(), kv_cache.growing(DynamicCache())
    for t in (5, 1, 7, 40, 3):
        k, v = torch.randn(2, 2, t, 4, generator=g), torch.randn(2, 2, t, 4, generator=g)
        for c in (plain, grow):
            c.update(k, v, 0)
        assert torch.equal(plain.layers[0].keys, grow.layers[0].keys)
        assert torch.equal(plain.layers[0].values, grow.layers[0].values)
    assert isinstance(grow.layers[0], kv_cache.GrowingLayer)
    for c in (plain, grow):
        kv_cache.crop(c, 50)
        kv_cache.compact(c, 40, torch.tensor([0, 3, 5]))
        c.batch_select_indices(torch.tensor([1]))
        c.update(torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4), 0)
    assert torch.equal(plain.layers[0].keys, grow.layers[0].keys) and grow.get_seq_length() == 45
    # compact_rows: row 0 keeps appended entries 1 and 2 at slots 3, 4; row 1 keeps entry 0 at slot 5; cut to 6.
    cache = kv_cache.growing(DynamicCache())
    keys = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 1, 8, 1)
    cache.update(keys, keys, 0)
    kv_cache.compact_rows(cache, torch.tensor([0, 0, 1]), torch.tensor([6, 7, 5]), torch.tensor([3, 4, 5]), 6)
    got = cache.layers[0].keys[:, 0, :, 0].tolist()
    assert got == [[0, 1, 2, 6, 7, 5], [8, 9, 10, 11, 12, 13]]
