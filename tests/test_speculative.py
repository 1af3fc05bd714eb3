"""Tests for :mod:`specvlm_lit.decoding.speculative` (correctness only, no timing thresholds).

Targets are tiny random LLaVA models. Drafters are test stubs implementing the EagleVLMDrafter forward contract:

* :class:`TinyDrafter` - fc(concat(embed, feature)) -> one HF ``LlamaDecoderLayer`` -> RMSNorm, random weights (low
  acceptance, but a real attention layer with RoPE, so wrong masks / positions / parent features change its output);
* :class:`OracleDrafter` - returns the target's *true* next feature for the context each row sees (reconstructed from
  the token ids in its KV "cache" and the attention mask), optionally plus deterministic noise. Without noise the
  draft distribution equals the target's, so whole trees get accepted (multi-token accepts, EOS inside the tree,
  budget cut mid-tree); with noise the accepted path often runs through non-first siblings.
"""

from __future__ import annotations

import copy
import hashlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from specvlm_lit.attention_masks import additive_mask
from specvlm_lit.decoding.acceptance import WarpConfig, warp_logits
from specvlm_lit.decoding.cost_model import AcceptanceCalibration, RoundCostModel, RunningMean
from specvlm_lit.decoding.speculative import (
    SpecStats,
    SpeculativeDecoder,
    TreeConfig,
    choose_total_tokens,
    square_layouts,
)
from specvlm_lit.decoding.tree import build_tree_from_fn
from specvlm_lit.drafter.sequence import CompressedVisual, build_draft_sequence
from specvlm_lit.target import TargetAdapter
from tests.helpers import chi2_pvalue_of_cells, pooled_cells
from tests.test_target_adapter import build_tiny_llava, make_vlm_inputs, tiny_llava_config

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------- targets
def _target_b() -> LlavaForConditionalGeneration:
    """Second target: multi-head attention (kv heads == heads), 3 layers, other seed."""
    torch.manual_seed(1)
    cfg = tiny_llava_config(
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=120,
            max_position_embeddings=512,
        )
    )
    return LlavaForConditionalGeneration(cfg).eval()


_TARGETS: dict[str, TargetAdapter] = {}


def get_target(name: str) -> TargetAdapter:
    if name not in _TARGETS:
        if name == "a":  # GQA: 4 heads, 2 kv heads
            _TARGETS[name] = TargetAdapter(build_tiny_llava(0))
        elif name == "b":
            _TARGETS[name] = TargetAdapter(_target_b())
        elif name == "peaked":  # sharper next-token distributions so that top-k trees catch most of the mass
            model = build_tiny_llava(2)
            with torch.no_grad():
                model.lm_head.weight.mul_(15.0)
            _TARGETS[name] = TargetAdapter(model)
        else:
            raise KeyError(name)
    return _TARGETS[name]


# ------------------------------------------------------------------------------------------------ drafters
def _full_mask(attention_mask, B: int, T: int, past: int) -> torch.Tensor:
    """Any allowed mask form -> additive [B, 1, T, past + T]."""
    causal = torch.arange(past + T)[None, :] <= (torch.arange(T) + past)[:, None]
    if attention_mask is None:
        return additive_mask(causal, torch.float32)[None, None].expand(B, 1, T, past + T)
    if attention_mask.dim() == 2:
        allowed = causal[None] & attention_mask.bool()[:, None, :]
        return additive_mask(allowed, torch.float32)[:, None]
    assert attention_mask.shape == (B, 1, T, past + T), attention_mask.shape
    return attention_mask


class TinyDrafter(nn.Module):
    """Random-weight EAGLE-style drafter with the EagleVLMDrafter forward signature."""

    def __init__(self, hidden: int = 64, seed: int = 0, compressor=None):
        super().__init__()
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=8,
            max_position_embeddings=1024,
        )
        cfg._attn_implementation = "eager"
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(cfg)
        self.norm = LlamaRMSNorm(hidden)
        self.compressor = compressor
        self.calls = 0
        self.eval()

    def new_cache(self):
        return DynamicCache()

    def forward(self, token_embeds, features, position_ids, attention_mask=None, past_key_values=None, use_cache=False):
        self.calls += 1
        B, T, _ = token_embeds.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        x = self.fc(torch.cat([token_embeds, features], -1))
        mask = _full_mask(attention_mask, B, T, past)
        h = self.layer(
            x,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=self.rotary(x, position_ids),
        )
        return SimpleNamespace(hidden=self.norm(h), past_key_values=past_key_values)


class OracleDrafter(nn.Module):
    """Predicts the target's true next feature (plus optional deterministic noise).

    Its "KV cache" is a DynamicCache storing the token id of every row (so the decoder's crop works on it). The
    context a row sees is read from the attention mask; row t's tokens are x_1..x_{t+1}, and the target's final
    feature at x_{t+1} given x_0..x_{t+1} is the prediction. Every context is the prompt (or a prefix of it) plus
    generated tokens; the latter are run on a copy of the prompt's KV cache, batched per length, and memoised.
    """

    def __init__(self, adapter: TargetAdapter, input_ids, image_features=None, noise: float = 0.0):
        super().__init__()
        self.adapter = adapter
        self.prompt = tuple(input_ids[0].tolist())
        self.noise = noise
        self.compressor = None
        self.memo: dict[tuple, torch.Tensor] = {}
        self.table = adapter.embed_tokens.weight.detach()
        self.prompt_cache = adapter.new_cache()
        hidden = adapter.forward(
            input_ids, image_features=image_features, past_key_values=self.prompt_cache, use_cache=True
        ).hidden[0]
        for j in range(1, len(self.prompt) + 1):
            self.memo[self.prompt[:j]] = hidden[j - 1]

    def new_cache(self):
        return DynamicCache()

    def _ids(self, embeds: torch.Tensor) -> list[int]:
        """Token ids of the rows; visual rows (no exact embedding match) become the image token id."""
        d = (embeds[:, None, :] - self.table[None]).abs().amax(-1)  # [T, V]
        dist, idx = d.min(-1)
        return [int(i) if float(v) == 0.0 else self.adapter.image_token_id for v, i in zip(dist, idx)]

    def _compute(self, contexts: list[tuple]) -> None:
        T0 = len(self.prompt)
        needed = [c for c in dict.fromkeys(contexts) if c not in self.memo]
        for c in needed:
            assert c[:T0] == self.prompt, "context does not extend the prompt"
        while needed:
            L = max(len(c) for c in needed)
            batch = [c for c in needed if len(c) == L]
            cache = copy.deepcopy(self.prompt_cache)
            cache.batch_repeat_interleave(len(batch))
            suffix = torch.tensor([c[T0:] for c in batch])
            hidden = self.adapter.forward(suffix, past_key_values=cache, use_cache=True).hidden
            for b, c in enumerate(batch):
                for j in range(T0 + 1, L + 1):  # causal: every prefix's last feature is known too
                    self.memo.setdefault(c[:j], hidden[b, j - 1 - T0])
            needed = [c for c in needed if c not in self.memo]

    def _noisy(self, ctx: tuple, f: torch.Tensor) -> torch.Tensor:
        if not self.noise:
            return f
        seed = int.from_bytes(hashlib.sha1(repr(ctx).encode()).digest()[:6], "little")
        g = torch.Generator().manual_seed(seed)
        return f + self.noise * f.std() * torch.randn(f.shape, generator=g)

    def forward(self, token_embeds, features, position_ids, attention_mask=None, past_key_values=None, use_cache=False):
        B, T, _ = token_embeds.shape
        assert B == 1
        cache = past_key_values
        past = cache.get_seq_length()
        new = self._ids(token_embeds[0])
        old = cache.layers[0].keys[0, 0, :, 0].long().tolist() if past else []
        val = torch.tensor(new, dtype=torch.float32)[None, None, :, None]
        cache.update(val, val, 0)
        all_ids = old + new
        if past == 0:  # prefill rows cover the prompt: use its true ids (visual rows included)
            n = min(len(self.prompt) - 1, len(all_ids))
            all_ids[:n] = self.prompt[1 : n + 1]
        mask = _full_mask(attention_mask, 1, T, past)[0, 0] == 0  # [T, past + T] visible
        contexts = [
            (self.prompt[0],) + tuple(all_ids[j] for j in mask[i].nonzero().flatten().tolist()) for i in range(T)
        ]
        self._compute(contexts)
        out = torch.stack([self._noisy(c, self.memo[c]) for c in contexts])[None]
        return SimpleNamespace(hidden=out, past_key_values=cache)


class MeanPoolCompressor:
    """Stub visual compressor: average-pools consecutive groups of ``ratio`` rows (deterministic)."""

    def __init__(self, ratio: int = 4):
        self.ratio = ratio

    def __call__(self, embeds, features, grid, question):
        n, h = embeds.shape
        m = max(1, n // self.ratio)
        e = embeds[: m * self.ratio].reshape(m, -1, h).mean(1)
        f = features[: m * self.ratio].reshape(m, -1, h).mean(1)
        return CompressedVisual(e, f)


# ---------------------------------------------------------------------------------------------- references
def hf_greedy(adapter, ids, feats, n, eos=None) -> list[int]:
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    if feats:
        kwargs["mm_encoder_outputs"] = adapter.as_mm_encoder_outputs(feats)
    return adapter.model.generate(**kwargs)[0, ids.shape[1] :].tolist()


class BookkeepingChecker:
    """Debug hook checking the draft/target cache invariants after every round."""

    def __init__(self):
        self.offset = None  # drafter rows minus target positions (M - N with a visual compressor)
        self.rounds = 0
        self.events = []
        self.non_first_accepts = 0  # accepted nodes that are not their parent's first (top-ranked) child
        self._tree = None

    def __call__(self, event, info):
        self.events.append(event)
        if event == "prefill":
            self.offset = info["draft_sequence"].position_offset
        if event in ("prefill", "round"):
            seq = info["sequence"]  # prompt + emitted tokens; the last one is the root of the next tree
            assert info["draft_len"] == len(seq) - 1 + self.offset
            assert info["draft_cache"].get_seq_length() == info["draft_len"]
            assert info["target_cache"].get_seq_length() == len(seq) - 1
            if event == "round":
                self.rounds += 1
                tree = self._tree
                for node in info["acceptance"].accepted.tolist()[1:]:
                    self.non_first_accepts += int(tree.children(int(tree.parents[node]))[0]) != node
            self.last = info
        elif event == "tree":
            assert info["draft_cache"].get_seq_length() == info["draft_len"]  # tree rows cropped again
            self._tree = info["tree"]


def _inputs(adapter, sizes, n_text, seed):
    ids, images = make_vlm_inputs(adapter, sizes, n_text=n_text, seed=seed)
    feats = adapter.encode_images(images) if images else None
    return ids, feats


# ------------------------------------------------------------------------------------------ greedy equality
GREEDY_CASES = [
    # target, image sizes, n_text, prompt seed, drafter, tree (top_k, depth, total)
    ("a", [(32, 32)], 5, 0, "tiny", (10, 7, 60)),
    ("a", [(16, 16)], 4, 1, "oracle", (10, 7, 60)),
    ("a", [(32, 32)], 3, 2, "noisy", (4, 4, 12)),
    ("a", [], 6, 3, "oracle", (1, 5, 6)),
    ("b", [(16, 16)], 5, 4, "tiny", (1, 4, 5)),
    ("b", [(32, 32)], 5, 5, "noisy", (10, 7, 60)),
    ("b", [(32, 32)], 2, 6, "oracle", (3, 3, 8)),
]


def _make_drafter(kind, adapter, ids, feats, seed=0):
    if kind == "tiny":
        return TinyDrafter(adapter.hidden_size, seed=seed)
    return OracleDrafter(adapter, ids, feats, noise={"oracle": 0.0, "noisy": 1.5}[kind])


def _greedy_references(adapter, ids, feats, n_long):
    """HF greedy output of ``n_long`` tokens, an EOS that really occurs in it (not at its very start, so that
    decoding stops inside a tree), and HF's output with that EOS."""
    ref = hf_greedy(adapter, ids, feats, n_long)
    eos = ref[min(len(ref) - 1, 9)]
    ref_eos = hf_greedy(adapter, ids, feats, n_long, eos=eos)
    assert ref_eos[-1] == eos
    return ref, eos, ref_eos


@pytest.mark.parametrize("target,sizes,n_text,seed,drafter_kind,shape", GREEDY_CASES)
def test_greedy_matches_hf_generate(target, sizes, n_text, seed, drafter_kind, shape):
    adapter = get_target(target)
    ids, feats = _inputs(adapter, sizes, n_text, seed)
    n_long = 44
    ref, eos, ref_eos = _greedy_references(adapter, ids, feats, n_long)
    drafter = _make_drafter(drafter_kind, adapter, ids, feats)
    top_k, depth, total = shape
    for clip in (True, False):
        checker = BookkeepingChecker()
        dec = SpeculativeDecoder(
            adapter, drafter, TreeConfig(top_k, depth, total, clip_to_budget=clip), WarpConfig(), debug_hook=checker
        )
        for n in (1, 2, 3, n_long) if clip else (3, n_long):
            res = dec.generate(ids, feats, max_new_tokens=n, eos_token_id=None)
            assert res.tokens.tolist() == ref[:n], (n, clip)
            st = res.stats
            assert st.new_tokens == n and st.rounds == st.verify_rounds + 1
            assert len(st.accepted_drafts) == st.verify_rounds and (n > 1 or st.verify_rounds == 0)
            assert 1.0 <= st.sigma <= depth + 1
            assert sum(st.emitted_per_round) + 1 == n
        res = dec.generate(ids, feats, max_new_tokens=n_long, eos_token_id=[eos, 10_000])
        assert res.tokens.tolist() == ref_eos
        assert res.stats.finished_by_eos == (ref_eos[-1] == eos)
        if drafter_kind == "noisy":  # accepted paths also run through lower-ranked siblings
            assert checker.non_first_accepts > 0
    if drafter_kind == "oracle":
        # The oracle's top-1 is the target's argmax, so the greedy chain is in the tree as deep as the re-ranking
        # keeps it: a chain config accepts every draft; wider trees still accept several per round.
        dec = SpeculativeDecoder(adapter, drafter, TreeConfig(top_k, depth, total, clip_to_budget=False), WarpConfig())
        st = dec.generate(ids, feats, max_new_tokens=n_long).stats
        if top_k == 1:
            assert all(a == depth for a in st.accepted_drafts), st.accepted_drafts
            assert st.verify_rounds == math.ceil((n_long - 1) / (depth + 1))
        else:
            assert min(st.accepted_drafts) >= 1 and st.sigma > 2, st.accepted_drafts


def _frozen_cost(verify, step=0.004, fixed=0.002, calibrate=True):
    return RoundCostModel(
        verify,
        step=RunningMean(value=step, frozen=True),
        fixed=RunningMean(value=fixed, frozen=True),
        calibration=AcceptanceCalibration() if calibrate else None,
    )


STEEP = {2: 0.010, 64: 0.100}  # small-CPU-like: verification cost grows with every node
FLAT = {2: 0.020, 64: 0.021}  # GPU-like: extra nodes are nearly free


@pytest.mark.parametrize("target,sizes,n_text,seed,drafter_kind,shape", [GREEDY_CASES[i] for i in (0, 2, 3, 5, 6)])
def test_adaptive_trees_stay_lossless(target, sizes, n_text, seed, drafter_kind, shape):
    """tree.adaptive only changes how much is drafted and verified: greedy output == generate() whatever it picks."""
    adapter = get_target(target)
    ids, feats = _inputs(adapter, sizes, n_text, seed)
    n_long = 40
    ref, eos, ref_eos = _greedy_references(adapter, ids, feats, n_long)
    drafter = _make_drafter(drafter_kind, adapter, ids, feats)
    top_k, depth, total = shape
    for cost in (None, _frozen_cost(STEEP), _frozen_cost(FLAT)):  # None: timed on this machine
        dec = SpeculativeDecoder(
            adapter,
            drafter,
            TreeConfig(top_k, depth, total, adaptive=True),
            WarpConfig(),
            debug_hook=BookkeepingChecker(),
            cost_model=cost,
        )
        for n in (1, 3, n_long):
            res = dec.generate(ids, feats, max_new_tokens=n)
            assert res.tokens.tolist() == ref[:n], (n, cost)
            assert all(2 <= size <= total for size in res.stats.tree_sizes[:-1] if n > 3)
        res = dec.generate(ids, feats, max_new_tokens=n_long, eos_token_id=eos)
        assert res.tokens.tolist() == ref_eos


class ScaledOracle(OracleDrafter):
    """The oracle with its features scaled: the same argmax (always the target's), with sharper (scale > 1) or
    flatter (scale < 1) probabilities. The cost model reads draft confidence as acceptance probability."""

    def __init__(self, *args, scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.hidden = out.hidden * self.scale
        return out


def test_adaptive_trees_follow_cost_and_confidence():
    adapter = get_target("peaked")
    ids, feats = _inputs(adapter, [(32, 32)], 5, 0)
    ref = hf_greedy(adapter, ids, feats, 40)

    def run(scale, verify, calibrate=False):
        dec = SpeculativeDecoder(
            adapter,
            ScaledOracle(adapter, ids, feats, scale=scale),
            TreeConfig(10, 7, 60, adaptive=True),
            WarpConfig(),
            cost_model=_frozen_cost(verify, calibrate=calibrate),
        )
        res = dec.generate(ids, feats, max_new_tokens=40)
        res2 = dec.generate(ids, feats, max_new_tokens=40)  # a second request: calibration carries over
        assert res.tokens.tolist() == res2.tokens.tolist() == ref
        return res2.stats

    def mean_depth(st):
        return sum(st.tree_depths) / len(st.tree_depths)

    sure_flat, sure_steep, unsure_steep = run(8.0, FLAT), run(8.0, STEEP), run(0.25, STEEP)
    # Raw draft probabilities: a confident drafter drafts deep trees; with free verification they stay wide too.
    assert max(sure_flat.tree_depths) == 7 and max(sure_flat.tree_sizes) > max(sure_steep.tree_sizes)
    assert sure_steep.sigma > 3
    # An unsure one (same tokens, flat probabilities) on a costly target drafts little: shallow, small trees.
    assert max(unsure_steep.tree_sizes) < 60 and mean_depth(unsure_steep) < mean_depth(sure_steep)
    # With calibration the decoder learns that this unsure drafter is always right, and drafts deeper.
    mid = {2: 0.010, 64: 0.040}
    raw, calibrated = run(0.25, mid), run(0.25, mid, calibrate=True)
    assert mean_depth(calibrated) > mean_depth(raw) and calibrated.sigma > raw.sigma


def test_greedy_eos_inside_tree_and_budget_cut_mid_tree():
    """Oracle drafter, full trees: the EOS / budget fall strictly inside an accepted path."""
    adapter = get_target("a")
    ids, feats = _inputs(adapter, [(32, 32)], 4, 7)
    ref = hf_greedy(adapter, ids, feats, 30)
    drafter = OracleDrafter(adapter, ids, feats)
    dec = SpeculativeDecoder(adapter, drafter, TreeConfig(1, 6, 7, clip_to_budget=False), WarpConfig())
    # Budget: the first round accepts 6 drafts + bonus = 7 tokens; max_new_tokens=4 cuts it after 3.
    res = dec.generate(ids, feats, max_new_tokens=4)
    assert res.tokens.tolist() == ref[:4]
    assert res.stats.accepted_drafts == [6] and res.stats.emitted_per_round == [3]
    # EOS: the first token whose first occurrence is at index 3..5 lies strictly inside round 1's path.
    cand = [ref[i] for i in range(3, 6) if ref[i] not in ref[:i]]
    assert cand, "degenerate greedy output: pick another prompt seed"
    eos = cand[0]
    ref_eos = hf_greedy(adapter, ids, feats, 30, eos=eos)
    res = dec.generate(ids, feats, max_new_tokens=30, eos_token_id=eos)
    assert res.tokens.tolist() == ref_eos and res.stats.verify_rounds == 1
    assert res.stats.emitted_per_round[0] < res.stats.accepted_drafts[0] + 1
    # First token is EOS: stops after the prefill without drafting.
    res = dec.generate(ids, feats, max_new_tokens=30, eos_token_id=ref[0])
    assert res.tokens.tolist() == [ref[0]] and res.stats.verify_rounds == 0 and res.stats.sigma == 1.0


def test_pixel_values_and_interpolated_image():
    adapter = get_target("b")
    ids, images = make_vlm_inputs(adapter, [(16, 16)], n_text=4, seed=8)
    feats = adapter.encode_images(images)
    ref = hf_greedy(adapter, ids, feats, 12)
    dec = SpeculativeDecoder(adapter, TinyDrafter(seed=3), TreeConfig(4, 3, 10), WarpConfig())
    res = dec.generate(ids, pixel_values=torch.stack(images), max_new_tokens=12)
    assert res.tokens.tolist() == ref
    assert res.stats.target_visual_tokens == 4 == res.stats.draft_visual_tokens


def test_multi_image_prompt_under_inference_mode():
    """Two images (no compressor: plain pairing), everything under torch.inference_mode()."""
    adapter = get_target("a")
    ids, feats = _inputs(adapter, [(16, 16), (32, 32)], 3, 16)
    ref = hf_greedy(adapter, ids, feats, 10)
    dec = SpeculativeDecoder(
        adapter, TinyDrafter(seed=4), TreeConfig(3, 3, 9), WarpConfig(), debug_hook=BookkeepingChecker()
    )
    with torch.inference_mode():
        res = dec.generate(ids, feats, max_new_tokens=10)
    assert res.tokens.tolist() == ref
    assert res.stats.target_visual_tokens == res.stats.draft_visual_tokens == 20


def _accepted_rows(adapter, prompt, feats, seq, compressor=None):
    """Draft rows of an accepted sequence computed from scratch: the prompt's rows (build_draft_sequence, visual
    rows compressed with the prompt's question, as at decode time) + (e_{t+1}, f_t) for every later t, with the
    target's features from one plain forward (prompt with images, then the generated tokens as text)."""
    T0 = prompt.shape[1]
    cache = adapter.new_cache()
    h0 = adapter.forward(prompt, image_features=feats, past_key_values=cache, use_cache=True).hidden[0]
    gen = seq[T0:]
    hidden = torch.cat([h0, adapter.forward(gen[None], past_key_values=cache).hidden[0]]) if len(gen) else h0
    ds = build_draft_sequence(
        adapter.embed(prompt, feats)[0],
        h0,
        prompt[0],
        adapter.visual_token_ids,
        compressor=compressor,
        layouts=square_layouts(feats),
    )
    embeds = torch.cat([ds.embeds, adapter.embed_tokens(gen)])
    features = torch.cat([ds.features, hidden[T0 - 1 : len(seq) - 1]])
    return embeds, features


def _reference_tree(adapter, drafter, prompt, feats, seq, top_k, depth, total):
    """The draft tree recomputed from scratch: no draft KV cache, each node's path unrolled row by row."""
    rows_e0, rows_f0 = _accepted_rows(adapter, prompt, feats, seq, drafter.compressor)
    memo = {}

    def run(rows_e, rows_f):
        n = rows_e.shape[0]
        return drafter(rows_e[None], rows_f[None], torch.arange(n)[None]).hidden[0, -1]

    def hidden_of(path):  # path = [root, y1, .., yd]; row of y_j = (e_{y_j}, hidden of its parent)
        key = tuple(path)
        if key not in memo:
            if len(path) == 1:
                memo[key] = run(rows_e0, rows_f0)
            else:
                parents_h = [hidden_of(path[:j]) for j in range(1, len(path))]
                rows_e = torch.cat([rows_e0, adapter.embed_tokens(torch.tensor(path[1:]))])
                rows_f = torch.cat([rows_f0, torch.stack(parents_h)])
                memo[key] = run(rows_e, rows_f)
        return memo[key]

    def draft_fn(tokens, parents_mask, depths):
        rows = [hidden_of(tokens[parents_mask[i]].tolist()) for i in range(parents_mask.shape[0])]
        return torch.log_softmax(adapter.lm_head(torch.stack(rows)).float(), -1)

    return build_tree_from_fn(int(seq[-1]), draft_fn, top_k, depth, total)


def _eagle(adapter, compressor=None, seed=0):
    eagle = pytest.importorskip("specvlm_lit.drafter.eagle")
    torch.manual_seed(seed)
    return eagle.EagleVLMDrafter.for_target(adapter, compressor=compressor).eval()


DRAFTER_BUILDERS = {
    "tiny": lambda ad: TinyDrafter(seed=5),
    "tiny+meanpool": lambda ad: TinyDrafter(seed=5, compressor=MeanPoolCompressor(4)),
    "eagle": lambda ad: _eagle(ad),
    "eagle+select": lambda ad: _eagle(ad, {"type": "select"}, seed=1),
    "eagle+pool": lambda ad: _eagle(ad, {"type": "pool", "ratio": 4}),
}


@pytest.mark.parametrize("drafter_kind", sorted(DRAFTER_BUILDERS))
def test_draft_tree_and_cache_match_from_scratch_recomputation(drafter_kind):
    """Incremental drafting (cache, 4D tree masks, positions, parent features) == recomputation without cache;
    the final draft KV == a fresh draft prefill over the whole accepted sequence with the target's features;
    the output == HF greedy."""
    adapter = get_target("a")
    ids, feats = _inputs(adapter, [(32, 32)], 4, 9)
    drafter = DRAFTER_BUILDERS[drafter_kind](adapter)
    top_k, depth, total = 3, 4, 12
    trees = []
    checker = BookkeepingChecker()

    def hook(event, info):
        checker(event, info)
        if event == "tree":
            trees.append((info["sequence"].clone(), info["tree"]))

    dec = SpeculativeDecoder(adapter, drafter, TreeConfig(top_k, depth, total), WarpConfig(), debug_hook=hook)
    n = 14
    res = dec.generate(ids, feats, max_new_tokens=n)
    assert res.tokens.tolist() == hf_greedy(adapter, ids, feats, n)
    st = res.stats
    assert st.target_visual_tokens == 16 and st.draft_visual_tokens == 16 + checker.offset
    if drafter.compressor is not None:
        assert st.draft_visual_tokens < 16
    assert len(trees) == st.verify_rounds >= 2
    for seq, tree in trees[:4]:
        d = min(depth, n - (len(seq) - ids.shape[1]))
        ref = _reference_tree(adapter, drafter, ids, feats, seq, top_k, d, total)
        assert tree.tokens.tolist() == ref.tokens.tolist()
        assert tree.parents.tolist() == ref.parents.tolist()
        torch.testing.assert_close(tree.scores, ref.scores, atol=1e-4, rtol=0)
    # Final draft cache vs a fresh prefill over the accepted sequence (all but the not-yet-fed last token).
    rows_e, rows_f = _accepted_rows(adapter, ids, feats, checker.last["sequence"], drafter.compressor)
    fresh = drafter.new_cache()
    drafter(rows_e[None], rows_f[None], torch.arange(rows_e.shape[0])[None], past_key_values=fresh, use_cache=True)
    got = checker.last["draft_cache"]
    assert got.get_seq_length() == rows_e.shape[0] == checker.last["draft_len"]
    torch.testing.assert_close(got.layers[0].keys, fresh.layers[0].keys, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.layers[0].values, fresh.layers[0].values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("compressor", [None, {"type": "pool", "ratio": 4}])
def test_eagle_drafter_greedy_long_and_non_square_image(compressor):
    """Random-weight EagleVLMDrafter, default tree, pixel_values of a non-square interpolated image (grid inferred)."""
    adapter = get_target("b")
    ids, images = make_vlm_inputs(adapter, [(24, 40)], n_text=4, seed=15)
    feats = adapter.encode_images(images)
    ref = hf_greedy(adapter, ids, feats, 40)
    drafter = _eagle(adapter, compressor)
    dec = SpeculativeDecoder(adapter, drafter, TreeConfig(), WarpConfig(), debug_hook=BookkeepingChecker())
    res = dec.generate(ids, pixel_values=images, max_new_tokens=40)
    assert res.tokens.tolist() == ref
    assert res.stats.target_visual_tokens == 15
    assert res.stats.draft_visual_tokens == (15 if compressor is None else 6)  # 3x5 grid, 2x2 windows (ceil)
    with pytest.raises(ValueError, match="fingerprint"):
        SpeculativeDecoder(get_target("a"), drafter, TreeConfig(), WarpConfig())


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("adaptive", [False, True])
def test_sampling_first_token_distribution(adaptive):
    adapter = get_target("peaked")
    ids, _ = _inputs(adapter, [], 5, 10)
    warp = WarpConfig(temperature=1.0)
    probs = warp_logits(adapter.forward(ids).logits[0, -1], warp)
    dec = SpeculativeDecoder(
        adapter,
        TinyDrafter(seed=1),
        TreeConfig(4, 3, 10, adaptive=adaptive),
        warp,
        cost_model=_frozen_cost(STEEP) if adaptive else None,
    )
    g = torch.Generator().manual_seed(1234)
    n = 800
    counts: dict = {}
    for _ in range(n):
        t = int(dec.generate(ids, max_new_tokens=1, generator=g).tokens[0])
        counts[t] = counts.get(t, 0) + 1
    obs, exp = pooled_cells(counts, {i: float(p) for i, p in enumerate(probs)}, min_expected=5.0)
    assert len(obs) >= 3
    assert chi2_pvalue_of_cells(obs, exp) > 1e-3


@pytest.mark.parametrize("warp,n", [(WarpConfig(temperature=1.0), 900), (WarpConfig(0.8, top_k=40, top_p=0.9), 500)])
def test_sampling_second_token_from_tree_acceptance(warp, n):
    """Joint law of (x1, x2) == target's p(x1) p(x2 | x1); x2 mostly comes from an accepted tree node."""
    adapter = get_target("peaked")
    ids, _ = _inputs(adapter, [], 4, 11)
    p1 = warp_logits(adapter.forward(ids).logits[0, -1], warp)
    drafter = OracleDrafter(adapter, ids)
    dec = SpeculativeDecoder(adapter, drafter, TreeConfig(6, 2, 20, clip_to_budget=False), warp)
    g = torch.Generator().manual_seed(99)
    counts: dict = {}
    from_tree = 0
    for _ in range(n):
        res = dec.generate(ids, max_new_tokens=2, generator=g)
        key = tuple(res.tokens.tolist())
        counts[key] = counts.get(key, 0) + 1
        from_tree += res.stats.accepted_drafts[0] >= 1
    assert from_tree > n // 2, from_tree
    joint = {}
    for x1 in range(adapter.vocab_size):
        if float(p1[x1]) * n < 1.0:
            continue
        p2 = warp_logits(adapter.forward(torch.cat([ids, torch.tensor([[x1]])], 1)).logits[0, -1], warp)
        for x2 in range(adapter.vocab_size):
            joint[(x1, x2)] = float(p1[x1]) * float(p2[x2])
    obs, exp = pooled_cells(counts, joint, min_expected=5.0)
    assert len(obs) >= 4
    assert chi2_pvalue_of_cells(obs, exp) > 1e-3


def test_sampling_long_generation_is_reproducible_and_respects_eos():
    adapter = get_target("peaked")
    ids, feats = _inputs(adapter, [(32, 32)], 4, 12)
    warp = WarpConfig(temperature=0.9, top_p=0.95)
    dec = SpeculativeDecoder(adapter, OracleDrafter(adapter, ids, feats, noise=0.3), TreeConfig(4, 4, 16), warp)
    a = dec.generate(ids, feats, max_new_tokens=30, generator=torch.Generator().manual_seed(3))
    b = dec.generate(ids, feats, max_new_tokens=30, generator=torch.Generator().manual_seed(3))
    assert a.tokens.tolist() == b.tokens.tolist() and len(a.tokens) == 30
    assert a.stats.sigma > 1.0 and max(a.stats.accepted_drafts) >= 2
    assert all(0 <= t < adapter.vocab_size for t in a.tokens.tolist())
    # EOS: the same randomness and the same trees up to the EOS (trees only depend on the accepted tokens), so the
    # output is the previous one cut right after the first EOS.
    eos = int(a.tokens[12])
    toks = a.tokens.tolist()
    c = dec.generate(ids, feats, max_new_tokens=30, eos_token_id=eos, generator=torch.Generator().manual_seed(3))
    assert c.tokens.tolist() == toks[: toks.index(eos) + 1]
    assert c.stats.finished_by_eos


# ------------------------------------------------------------------------------------------ stats & errors
def test_stats_sanity():
    adapter = get_target("a")
    ids, feats = _inputs(adapter, [(32, 32)], 5, 13)
    dec = SpeculativeDecoder(adapter, OracleDrafter(adapter, ids, feats, noise=1.0), TreeConfig(4, 4, 16), WarpConfig())
    st = dec.generate(ids, feats, max_new_tokens=20).stats
    assert isinstance(st, SpecStats)
    assert st.new_tokens == 20 and st.rounds == st.verify_rounds + 1
    assert st.sigma == pytest.approx(20 / st.rounds) and 1.0 <= st.sigma <= 5
    assert st.accept_length == pytest.approx(19 / st.verify_rounds)
    assert len(st.accepted_drafts) == len(st.tree_sizes) == len(st.emitted_per_round) == st.verify_rounds
    assert all(2 <= s <= 16 for s in st.tree_sizes[:-1])
    assert st.prompt_len == ids.shape[1] and st.target_visual_tokens == st.draft_visual_tokens == 16
    assert st.draft_prompt_rows == ids.shape[1] - 1
    # The last round is not fed back to the drafter: draft rows = tokens before that round's root; the target KV
    # additionally holds that round's root and accepted drafts.
    T, e_last, a_last = ids.shape[1], st.emitted_per_round[-1], st.accepted_drafts[-1]
    assert st.draft_kv_len == T + 20 - e_last - 1
    assert st.target_kv_len == T + 20 - e_last + a_last
    assert st.draft_kv_lens[:-1] == sorted(st.draft_kv_lens[:-1])
    assert st.time_total >= st.time_prefill + st.time_draft + st.time_verify - 1e-6
    assert min(st.time_prefill, st.time_draft, st.time_verify, st.time_other) >= 0
    d = st.as_dict()
    assert d["sigma"] == st.sigma and d["rounds"] == st.rounds


def test_bad_inputs_raise_before_model_work():
    adapter = get_target("a")
    drafter = TinyDrafter(seed=0)
    dec = SpeculativeDecoder(adapter, drafter, TreeConfig(2, 2, 4), WarpConfig())
    ids, feats = _inputs(adapter, [(16, 16)], 3, 0)
    for kwargs, match in [
        (dict(input_ids=ids, max_new_tokens=0), "max_new_tokens"),
        (dict(input_ids=ids, max_new_tokens=-3), "max_new_tokens"),
        (dict(input_ids=ids, max_new_tokens=True), "max_new_tokens"),
        (dict(input_ids=ids[0], max_new_tokens=2), r"\[1, T\]"),
        (dict(input_ids=ids.repeat(2, 1), max_new_tokens=2), r"\[1, T\]"),
        (dict(input_ids=ids[:, :0], max_new_tokens=2), "empty"),
        (dict(input_ids=ids.float(), max_new_tokens=2), "integer"),
        (dict(input_ids=ids + 1000, max_new_tokens=2), "outside"),
        (dict(input_ids=ids, max_new_tokens=2, eos_token_id="x"), "eos_token_id"),
        (dict(input_ids=ids, image_features=feats, pixel_values=torch.zeros(1, 3, 16, 16), max_new_tokens=2), "either"),
        (dict(input_ids=ids, image_features=[torch.zeros(3, 64)], max_new_tokens=2), "visual tokens"),
    ]:
        kwargs.setdefault("image_features", feats if kwargs.get("input_ids") is ids else None)
        with pytest.raises(ValueError, match=match):
            dec.generate(**kwargs)
    assert drafter.calls == 0

    with pytest.raises(ValueError, match="top_k"):
        TreeConfig(top_k=0)
    with pytest.raises(ValueError, match="depth"):
        TreeConfig(depth=0)
    with pytest.raises(ValueError, match="total_tokens"):
        TreeConfig(total_tokens=1)
    with pytest.raises(ValueError, match="total_tokens"):
        TreeConfig(total_tokens="big")
    with pytest.raises(ValueError, match="temperature"):
        WarpConfig(temperature=-1.0)

    class WrongTarget(TinyDrafter):
        def check_target(self, adapter):
            raise ValueError("drafter was trained for target fingerprint deadbeef")

    with pytest.raises(ValueError, match="deadbeef"):
        SpeculativeDecoder(adapter, WrongTarget(), TreeConfig(), WarpConfig())


def test_auto_total_tokens():
    adapter = get_target("a")
    n = choose_total_tokens(adapter, 20, candidates=(4, 8, 16), depth=3, top_k=2, repeats=1)
    assert n in (4, 8, 11)  # 16 is clipped to the largest possible tree: 1 + 2 + 2 * 2 * 2 = 11 nodes
    ids, feats = _inputs(adapter, [(16, 16)], 3, 14)
    dec = SpeculativeDecoder(adapter, TinyDrafter(seed=2), TreeConfig(3, 3, "auto"), WarpConfig())
    res = dec.generate(ids, feats, max_new_tokens=8)
    assert res.tokens.tolist() == hf_greedy(adapter, ids, feats, 8)
    assert res.stats.total_tokens >= 2
