"""EAGLE-3 drafter (:mod:`specvlm_lit.drafter.eagle3`) and the drafter protocol, on tiny random LLaVA targets.

Decoding with every drafter type (EAGLE-2 and EAGLE-3 variants, parametrized) is checked against HF greedy
``generate()`` token for token, and the incremental tree drafting against a from-scratch recomputation written only
in terms of the protocol (project_features / draft_logprobs). Drafters that accept often are made by overfitting a
fresh drafter on the target's own greedy continuation (a few hundred Adam steps on a 64-wide layer, ~1 s), so accept
paths (multi-token accepts, deep trees) are exercised, not only rejections.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from specvlm_lit.decoding.acceptance import WarpConfig, warp_logits
from specvlm_lit.decoding.speculative import SpeculativeDecoder, TreeConfig, square_layouts
from specvlm_lit.decoding.tree import build_tree_from_fn
from specvlm_lit.drafter.base import (
    DrafterLoadError,
    DrafterMismatchError,
    known_drafter_types,
    load_drafter,
    save_atomically,
)
from specvlm_lit.drafter.eagle import EagleVLMDrafter
from specvlm_lit.drafter.eagle3 import Eagle3VLMDrafter, default_hidden_layers
from specvlm_lit.drafter.sequence import build_draft_sequence
from specvlm_lit.drafter.vocab import d2t_t2d, most_frequent
from specvlm_lit.target import TargetAdapter
from specvlm_lit.training.distill import drafter_settings
from tests.helpers import chi2_pvalue_of_cells, pooled_cells
from tests.test_speculative import BookkeepingChecker, _inputs, get_target, hf_greedy
from tests.test_target_adapter import build_tiny_llava

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ drafters
def _fit(drafter, adapter, ids, feats, steps: int = 150):
    """Overfit ``drafter`` on the target's greedy continuation of ``ids`` (teacher forcing on the true rows), so that
    decoding this prompt accepts often."""
    cont = torch.tensor(hf_greedy(adapter, ids, feats, 30))[None]
    full = torch.cat([ids, cont], 1)
    out = adapter.forward(full, image_features=feats, hidden_layers=drafter.hidden_layers)
    target_next = out.logits[0, 1:].argmax(-1)  # row t predicts x_{t+2} = argmax logits[t + 1]
    opt = torch.optim.Adam(drafter.parameters(), lr=3e-3)
    drafter.train()
    for _ in range(steps):
        rows_f = drafter.project_features(out)[0]
        rows_e = drafter.token_embeds(adapter, full, out.inputs_embeds)[0]
        seq = build_draft_sequence(rows_e, rows_f, full[0], adapter.visual_token_ids)
        h = drafter(seq.embeds[None], seq.features[None]).hidden[0]
        logp = drafter.draft_logprobs(h, adapter)
        loss = torch.nn.functional.nll_loss(logp.clamp(min=-1e4), target_next)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter.eval()


def _eagle3(adapter, seed=0, **kw):
    torch.manual_seed(seed)
    return Eagle3VLMDrafter.for_target(adapter, **kw).eval()


def _pruned(adapter, ids, feats, size, seed=0, **kw):
    """EAGLE-3 with a draft vocabulary of ``size`` tokens that holds the prompt's greedy continuation."""
    drafter = _eagle3(adapter, seed, draft_vocab_size=size, **kw)
    counts = torch.zeros(adapter.vocab_size)
    counts[torch.tensor(hf_greedy(adapter, ids, feats, 30))] += 1
    drafter.set_draft_vocab(most_frequent(counts, size), target=adapter)
    return drafter


BUILDERS = {
    "eagle2": lambda ad, ids, feats: EagleVLMDrafter.for_target(ad).eval(),
    "eagle3": lambda ad, ids, feats: _eagle3(ad),
    "eagle3+select": lambda ad, ids, feats: _eagle3(ad, 1, compressor={"type": "select"}),
    "eagle3+pool": lambda ad, ids, feats: _eagle3(ad, compressor={"type": "pool", "ratio": 4}),
    "eagle3+vocab": lambda ad, ids, feats: _pruned(ad, ids, feats, 40),
    "eagle3+placeholder": lambda ad, ids, feats: _eagle3(ad, image_rows="placeholder", hidden_layers=[0, 1]),
    "eagle3-fit": lambda ad, ids, feats: _fit(_eagle3(ad), ad, ids, feats),
    "eagle3+vocab-fit": lambda ad, ids, feats: _fit(_pruned(ad, ids, feats, 40), ad, ids, feats),
    "eagle2-fit": lambda ad, ids, feats: _fit(EagleVLMDrafter.for_target(ad), ad, ids, feats),
}


# ---------------------------------------------------------------------------------------------- references
def _accepted_rows(adapter, drafter, prompt, feats, seq):
    """Draft rows of an accepted sequence from scratch: one plain target forward over prompt + generated tokens
    (features through the drafter's own projection), prompt rows through build_draft_sequence."""
    T0 = prompt.shape[1]
    out = adapter.forward(seq[None], image_features=feats, hidden_layers=drafter.hidden_layers)
    rows_f = drafter.project_features(out)[0]
    e_prompt = drafter.token_embeds(adapter, prompt, adapter.embed(prompt, feats))[0]
    ds = build_draft_sequence(
        e_prompt,
        rows_f[:T0],
        prompt[0],
        adapter.visual_token_ids,
        compressor=drafter.compressor,
        layouts=square_layouts(feats),
    )
    embeds = torch.cat([ds.embeds, adapter.embed_tokens(seq[T0:])])
    features = torch.cat([ds.features, rows_f[T0 - 1 : len(seq) - 1]])
    return embeds, features


def _reference_tree(adapter, drafter, prompt, feats, seq, top_k, depth, total):
    rows_e0, rows_f0 = _accepted_rows(adapter, drafter, prompt, feats, seq)
    memo = {}

    def hidden_of(path):  # row of y_j = (e_{y_j}, hidden of its parent)
        key = tuple(path)
        if key not in memo:
            rows_e, rows_f = rows_e0, rows_f0
            if len(path) > 1:
                rows_e = torch.cat([rows_e0, adapter.embed_tokens(torch.tensor(path[1:]))])
                rows_f = torch.cat([rows_f0, torch.stack([hidden_of(path[:j]) for j in range(1, len(path))])])
            memo[key] = drafter(rows_e[None], rows_f[None], torch.arange(rows_e.shape[0])[None]).hidden[0, -1]
        return memo[key]

    def draft_fn(tokens, parents_mask, depths):
        rows = torch.stack([hidden_of(tokens[parents_mask[i]].tolist()) for i in range(parents_mask.shape[0])])
        return drafter.draft_logprobs(rows, adapter)

    return build_tree_from_fn(int(seq[-1]), draft_fn, top_k, depth, total)


# ------------------------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_greedy_identical_to_hf_and_tree_matches_recomputation(kind):
    adapter = get_target("a")
    ids, feats = _inputs(adapter, [(32, 32)], 4, 9)
    drafter = BUILDERS[kind](adapter, ids, feats)
    top_k, depth, total = 3, 4, 12
    trees, checker = [], BookkeepingChecker()

    def hook(event, info):
        checker(event, info)
        if event == "tree":
            trees.append((info["sequence"].clone(), info["tree"]))

    n = 24
    with torch.no_grad():
        dec = SpeculativeDecoder(adapter, drafter, TreeConfig(top_k, depth, total), WarpConfig(), debug_hook=hook)
        res = dec.generate(ids, feats, max_new_tokens=n)
        assert res.tokens.tolist() == hf_greedy(adapter, ids, feats, n)
        if kind.endswith("-fit"):  # the overfit drafters really accept: several tokens per round
            assert res.stats.sigma > 2.0, res.stats.sigma
        for seq, tree in trees[:3]:
            d = min(depth, n - (len(seq) - ids.shape[1]))
            ref = _reference_tree(adapter, drafter, ids, feats, seq, top_k, d, total)
            assert tree.tokens.tolist() == ref.tokens.tolist()
            assert tree.parents.tolist() == ref.parents.tolist()
            torch.testing.assert_close(tree.scores, ref.scores, atol=1e-4, rtol=0)
        if drafter.draft_vocab is not None:  # every drafted token lies in the draft vocabulary
            vocab = set(drafter.draft_vocab.tolist())
            assert all(set(t.tokens[1:].tolist()) <= vocab for _, t in trees)


@pytest.mark.parametrize("kind", ["eagle3-fit", "eagle3+vocab-fit"])
def test_greedy_long_non_square_image_and_batched(kind):
    """Default tree, pixel_values of a non-square image, 40 tokens; the batched decoder agrees too."""
    from tests.test_target_adapter import make_vlm_inputs

    adapter = get_target("b")
    ids, images = make_vlm_inputs(adapter, [(24, 40)], n_text=4, seed=15)
    feats = adapter.encode_images(images)
    drafter = BUILDERS[kind](adapter, ids, feats)
    ref = hf_greedy(adapter, ids, feats, 40)
    with torch.no_grad():
        dec = SpeculativeDecoder(adapter, drafter, TreeConfig(), WarpConfig(), debug_hook=BookkeepingChecker())
        res = dec.generate(ids, pixel_values=images, max_new_tokens=40)
    assert res.tokens.tolist() == ref and res.stats.sigma > 2.0
    batched = pytest.importorskip("specvlm_lit.decoding.batched")
    ids2, feats2 = _inputs(adapter, [], 6, 2)
    with torch.no_grad():
        dec = batched.BatchedSpeculativeDecoder(adapter, drafter, TreeConfig(4, 4, 16), WarpConfig())
        out = dec.generate([ids, ids2], [feats, None], max_new_tokens=20)
    assert out.tokens[0].tolist() == ref[:20]
    assert out.tokens[1].tolist() == hf_greedy(adapter, ids2, None, 20)


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_joint_law_of_two_tokens_with_pruned_vocab():
    """Joint law of (x1, x2) == the target's p(x1) p(x2 | x1) with an EAGLE-3 drafter whose pruned vocabulary
    gives many target tokens draft probability 0 (the residual must supply them); x2 mostly from the tree."""
    adapter = get_target("peaked")
    ids, feats = _inputs(adapter, [], 4, 11)
    drafter = _fit(_pruned(adapter, ids, feats, 24), adapter, ids, feats, steps=100)
    warp = WarpConfig(temperature=1.0)
    with torch.no_grad():
        p1 = warp_logits(adapter.forward(ids).logits[0, -1], warp)
        dec = SpeculativeDecoder(adapter, drafter, TreeConfig(6, 2, 20, clip_to_budget=False), warp)
        g = torch.Generator().manual_seed(99)
        counts: dict = {}
        n, from_tree = 700, 0
        for _ in range(n):
            res = dec.generate(ids, max_new_tokens=2, generator=g)
            key = tuple(res.tokens.tolist())
            counts[key] = counts.get(key, 0) + 1
            from_tree += res.stats.accepted_drafts[0] >= 1
    assert from_tree > n // 5, from_tree  # the accept path is exercised (~30%), not only the residual
    with torch.no_grad():
        expected = {}
        for x1 in range(adapter.vocab_size):
            if p1[x1] < 1e-4:
                continue
            p2 = warp_logits(adapter.forward(torch.cat([ids, torch.tensor([[x1]])], 1)).logits[0, -1], warp)
            for x2 in range(adapter.vocab_size):
                expected[(x1, x2)] = float(p1[x1] * p2[x2])
    obs, exp = pooled_cells(counts, expected, min_expected=5.0)
    assert len(obs) >= 4
    assert chi2_pvalue_of_cells(obs, exp) > 1e-3


# ------------------------------------------------------------------------------------------ model and files
def test_default_layers_and_protocol_shapes():
    assert default_hidden_layers(32) == [2, 16, 29] and default_hidden_layers(8) == [2, 4, 5]
    assert default_hidden_layers(2) == [0, 1, 1] and default_hidden_layers(4) == [0, 2, 3]
    adapter = get_target("a")
    d = _eagle3(adapter, draft_vocab_size=30)
    assert d.hidden_layers == tuple(default_hidden_layers(adapter.num_layers))
    ids, feats = _inputs(adapter, [(16, 16)], 3, 1)
    out = adapter.forward(ids, image_features=feats, hidden_layers=d.hidden_layers)
    assert len(out.layer_hidden) == len(d.hidden_layers)
    f = d.project_features(out)
    assert f.shape == out.hidden.shape
    with pytest.raises(ValueError, match="hidden_layers"):
        d.project_features(adapter.forward(ids, image_features=feats))
    h = d(out.inputs_embeds, f).hidden
    lp = d.draft_logprobs(h, adapter)
    assert lp.shape[-1] == adapter.vocab_size and int(torch.isfinite(lp[0, 0]).sum()) == 30
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:-1]))
    # placeholder rows: the image token's own embedding at image rows
    p = _eagle3(adapter, image_rows="placeholder")
    rows = p.token_embeds(adapter, ids, out.inputs_embeds)
    torch.testing.assert_close(rows, adapter.embed_tokens(ids))
    with pytest.raises(ValueError, match="image_rows"):
        _eagle3(adapter, image_rows="pixels")
    with pytest.raises(ValueError, match="draft_vocab_size"):
        _eagle3(adapter, draft_vocab_size=adapter.vocab_size + 1)


def test_vocab_mapping():
    ids = most_frequent(torch.tensor([0, 5, 5, 1, 9, 0]), 3)
    assert ids.tolist() == [1, 2, 4]
    d2t, t2d = d2t_t2d(ids, 6)
    assert (torch.arange(3) + d2t).tolist() == [1, 2, 4] and t2d.tolist() == [False, True, True, False, True, False]
    with pytest.raises(ValueError):
        most_frequent(torch.ones(4), 5)


def _target_with_distinct_final_norm() -> tuple[TargetAdapter, torch.Tensor]:
    """A tiny target and its final-norm weight, set away from all ones so a copied norm is told from a fresh one."""
    model = build_tiny_llava(1)
    norm_weight = model.model.language_model.norm.weight
    with torch.no_grad():
        norm_weight.uniform_(0.5, 1.5)
    return TargetAdapter(model), norm_weight


@pytest.mark.parametrize("draft_vocab_size", [None, 12])
def test_head_and_norm_start_as_the_targets_rows(draft_vocab_size):
    adapter, target_norm = _target_with_distinct_final_norm()
    target_head = adapter.lm_head.weight
    drafter = _eagle3(adapter, draft_vocab_size=draft_vocab_size)
    if draft_vocab_size is not None:
        # scattered ids, so a copy that ignored d2t (the first 12 rows) would differ
        token_ids = torch.tensor([3, 7, 8, 15, 21, 22, 30, 41, 47, 50, 58, 63])
        drafter.set_draft_vocab(token_ids, target=adapter)
        assert torch.equal(drafter.draft_vocab, token_ids)
        expected = target_head[token_ids]
    else:
        expected = target_head
    assert torch.equal(drafter.lm_head.weight, expected)
    assert torch.equal(drafter.norm.weight, target_norm)
    # off: neither construction nor set_draft_vocab(target=...) touches the fresh head and norm
    fresh = _eagle3(adapter, draft_vocab_size=draft_vocab_size, init_head_from_target=False)
    if draft_vocab_size is not None:
        fresh.set_draft_vocab(token_ids, target=adapter)
    assert fresh.lm_head.weight.shape == expected.shape and not torch.allclose(fresh.lm_head.weight, expected)
    assert torch.equal(fresh.norm.weight, torch.ones_like(target_norm))


def test_init_head_option_round_trips_through_training_config_and_export(tmp_path):
    shipped = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf/drafter/eagle3.yaml"))
    assert shipped["init_head_from_target"] is True
    settings = drafter_settings({**shipped, "init_head_from_target": False})
    assert settings["config"]["init_head_from_target"] is False
    adapter = get_target("a")
    drafter = _eagle3(adapter, **settings["config"])
    path = save_atomically(drafter, tmp_path / "d3")
    assert json.loads((path / "config.json").read_text())["init_head_from_target"] is False
    loaded = load_drafter(path, target=adapter)
    assert loaded.config.init_head_from_target is False
    # loading keeps the trained weights: the option only chooses how a fresh drafter starts
    assert torch.equal(loaded.lm_head.weight, drafter.lm_head.weight)


def test_save_load_dispatch_and_errors(tmp_path):
    adapter = get_target("a")
    ids, feats = _inputs(adapter, [], 4, 3)
    d = _pruned(adapter, ids, feats, 40, compressor={"type": "pool", "ratio": 4})
    path = save_atomically(d, tmp_path / "d3")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "eagle3_vlm" and cfg["image_rows"] == "visual" and cfg["draft_vocab_size"] == 40
    loaded = load_drafter(path, target=adapter)
    assert isinstance(loaded, Eagle3VLMDrafter)
    assert torch.equal(loaded.draft_vocab, d.draft_vocab)
    for k, v in d.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    e2 = load_drafter(save_atomically(EagleVLMDrafter.for_target(adapter), tmp_path / "d2"))
    assert isinstance(e2, EagleVLMDrafter)
    with pytest.raises(DrafterLoadError, match="use load_drafter"):
        EagleVLMDrafter.load(path)
    # unknown type: the error lists the known ones
    cfg["model_type"] = "medusa_vlm"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrafterLoadError, match="known drafter types: " + ", ".join(known_drafter_types())):
        load_drafter(path)
    # a drafter reading more layers than the target has
    other = get_target("b")  # 3 layers, hidden 64
    deep = Eagle3VLMDrafter.for_target(adapter, hidden_layers=[0, 1])
    deep.config.hidden_layers = [0, 5]
    deep.config.target_fingerprint = None
    with pytest.raises(DrafterMismatchError):
        deep.check_target(other)


# ------------------------------------------------------------------------------------------- training-time test
def test_chain_unroll_rows_equal_decoding_view(tmp_path):
    """Step j's row t of the chain unroll == a plain draft forward over the true rows 0..t followed by the chain of
    own predictions (what a depth-(j+1) tree node sees when decoding); padding rows do not leak."""
    import functools

    from specvlm_lit.training.distill import DraftBatch, OnlineDistillation

    adapter = get_target("a")
    adapter.model.save_pretrained(tmp_path / "t")
    module = OnlineDistillation(
        str(tmp_path / "t"),
        functools.partial(torch.optim.AdamW, lr=1e-3),
        drafter={"model_type": "eagle3_vlm", "unroll_steps": 3, "unroll_mode": "chain", "lambda_feat": 0.0},
    )
    drafter = module.drafter.eval()
    B, L, H, V = 2, 7, adapter.hidden_size, adapter.vocab_size
    g = torch.Generator().manual_seed(0)
    pad = torch.ones(B, L, dtype=torch.long)
    pad[1, 5:] = 0
    source = torch.arange(L)[None].repeat(B, 1).masked_fill(pad == 0, -1)
    db = DraftBatch(
        embeds=torch.randn(B, L, H, generator=g),
        features=torch.randn(B, L, H, generator=g),
        padding=pad,
        target_feat=torch.zeros(B, L, H),
        teacher_logits=torch.randn(B, L, V, generator=g),
        valid=pad.bool(),
        branches=[None, None],
        visual_rows=[0, 0],
        source=source,
    )
    preds = []
    forward = drafter.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        preds.append(out.hidden.detach())
        return out

    drafter.forward = recording
    with torch.no_grad():
        module._losses(db, "val")
    drafter.forward = forward
    assert len(preds) == 3
    with torch.no_grad():
        for b, t in ((0, 2), (0, 3), (1, 1), (1, 2)):
            chain = [preds[0][b, t]]
            for j in (1, 2):
                if t + j >= int(pad[b].sum()):
                    break
                rows_e = db.embeds[b, : t + 1 + j]
                rows_f = torch.cat([db.features[b, : t + 1], torch.stack(chain)])
                ref = drafter(rows_e[None], rows_f[None]).hidden[0, -1]
                torch.testing.assert_close(preds[j][b, t], ref, atol=1e-5, rtol=0)
                chain.append(ref)


def test_target_returns_layer_inputs_in_the_same_forward():
    """TargetAdapter.forward / tree_forward(hidden_layers=...): HF output_hidden_states[i] (input of layer i), from
    the forward that gives the logits; out-of-range ids are refused; old-style hook overrides keep working."""
    from specvlm_lit.target import TargetAdapter

    adapter = get_target("b")
    ids, feats = _inputs(adapter, [(16, 16)], 3, 4)
    out = adapter.forward(ids, image_features=feats, hidden_layers=(2, 0))
    ref = adapter.model(
        input_ids=ids, mm_encoder_outputs=adapter.as_mm_encoder_outputs(feats), output_hidden_states=True
    )
    torch.testing.assert_close(out.layer_hidden[0], ref.hidden_states[2])
    torch.testing.assert_close(out.layer_hidden[1], ref.hidden_states[0])
    torch.testing.assert_close(out.logits, ref.logits)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 2\]"):
        adapter.forward(ids, image_features=feats, hidden_layers=(3,))
    # tree verification: the nodes' layer inputs equal a plain forward over prefix + path
    cache = adapter.new_cache()
    adapter.forward(ids, image_features=feats, past_key_values=cache, use_cache=True)
    nodes = torch.tensor([[7, 8, 9]])
    chain = torch.ones(3, 3, dtype=torch.bool).tril()
    pos = ids.shape[1] + torch.arange(3)[None]
    tree = adapter.tree_forward(nodes, pos, chain, cache, hidden_layers=(1,))
    plain = adapter.forward(torch.cat([ids, nodes], 1), image_features=feats, hidden_layers=(1,))
    torch.testing.assert_close(tree.layer_hidden[0][0], plain.layer_hidden[0][0, -3:], atol=1e-5, rtol=0)

    class OldStyle(TargetAdapter):  # an adapter written before hidden_layers existed
        model_types = ()

        def _decoder_forward(self, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache):
            out = self.model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state

    old = OldStyle(adapter.model)
    torch.testing.assert_close(old.forward(ids, image_features=feats).logits, out.logits)
    with pytest.raises(NotImplementedError, match="takes no hidden_layers"):
        old.forward(ids, image_features=feats, hidden_layers=(1,))
