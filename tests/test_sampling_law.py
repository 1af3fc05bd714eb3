"""Sampling-law tests: speculative sampling emits tokens distributed EXACTLY like sampling from the target.

Marginal tests of the first one or two emitted tokens cannot see a bug that only fires deeper in a round (with
depth-7 trees most accepted tokens sit at depth >= 3), so these tests compare the empirical JOINT law of the first
3 and 4 emitted tokens, over as many rounds as it takes to emit them, with the exact product of the (warped) target
conditionals:

* acceptance level: a fixed random "target" and a different "drafter" over a 5-token vocabulary (next-token
  logits are a hash-seeded function of the whole prefix), draft trees of four shapes built from the drafter the way
  the decoder builds them (deterministic top-k chains, EAGLE-2 dynamic trees via the product's TreeBuilder, full
  fan-outs) plus randomly sampled candidates, verified by ``accept_sampling`` with the target's logits at every
  node; plain and warped (temperature / top-k / top-p) sampling;
* end to end: :class:`SpeculativeDecoder` with table-driven mock target and drafter (default suite) and with a
  tiny random LLaVA target (``slow``);
* mutation check: every mutant of :mod:`tests.sampling_mutants` (wrong residuals, wrong bonus distributions,
  shared uniforms, deep-only bugs) monkeypatched in place of ``accept_sampling_probs`` must be rejected by the same
  test the product passes.

Statistic: Pearson chi-square over the joint cells (cells expected below 20 draws pooled into one), p-value from the
regularised upper incomplete gamma function (exact chi-square survival function, no scipy); any draw of a sequence
the target gives probability 0 is an outright failure. Fixed seeds, so results are deterministic; ALPHA = 1e-4.
"""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from specvlm_lit.decoding import acceptance
from specvlm_lit.decoding.acceptance import WarpConfig, accept_sampling, accept_sampling_probs, warp_logits
from specvlm_lit.decoding.speculative import SpeculativeDecoder, TreeConfig
from specvlm_lit.decoding.tree import DraftTree, build_tree_from_fn
from specvlm_lit.target import TargetAdapter
from tests.helpers import chi2_pvalue_of_cells, pooled_cells
from tests.sampling_mutants import MUTANTS, make_mutant, mutated_walk

V = 5  # vocabulary: 625 joint cells for 4 tokens
CONTEXT = (2, 2)  # the prompt; its last token is the first round's root (first-token law 0.35/0.39/0.23/0.03)
ALPHA = 1e-4
N_DRAWS = 12000


@pytest.fixture(autouse=True)
def _single_thread():
    """Thousands of ops on [n, 5] tensors: OpenMP wake-ups would dominate on a busy 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ the models
def _seed(seq: tuple, salt: int) -> int:
    h = 1469598103 + 7919 * salt
    for t in seq:
        h = (h * 1000003 + int(t) + 1) % (2**61 - 1)
    return h


class TargetTable:
    """Next-token logits for every token sequence: ``scale * N(0, 1)`` seeded by the whole sequence, with one
    token per sequence at ``-inf`` (never emitted), so rows differ at every prefix and node."""

    def __init__(self, salt: int = 1, scale: float = 1.6):
        self.salt, self.scale = salt, scale
        self._memo: dict[tuple, torch.Tensor] = {}

    def finite_logits(self, seq: tuple) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(seq, self.salt))
        return torch.randn(V, generator=g) * self.scale

    def logits(self, seq: tuple) -> torch.Tensor:
        row = self._memo.get(seq)
        if row is None:
            row = self.finite_logits(seq)
            row[_seed(seq, self.salt + 100) % V] = -float("inf")
            self._memo[seq] = row
        return row


class DrafterTable:
    """A drafter that is close to the target but not equal: target logits + noise, and no zeros: the target's
    impossible token gets a low but finite logit, so it is proposed now and then (mostly not as the top draft)."""

    def __init__(self, target: TargetTable, salt: int = 2, noise: float = 1.0):
        self.target, self.salt, self.noise = target, salt, noise
        self._memo: dict[tuple, torch.Tensor] = {}

    def logprobs(self, seq: tuple) -> torch.Tensor:
        row = self._memo.get(seq)
        if row is None:
            g = torch.Generator().manual_seed(_seed(seq, self.salt))
            t = self.target.logits(seq)
            t = torch.where(torch.isinf(t), t[torch.isfinite(t)].min() - 1.0, t)
            row = torch.log_softmax(t + self.noise * torch.randn(V, generator=g), -1)
            self._memo[seq] = row
        return row


TARGET = TargetTable()
DRAFTER = DrafterTable(TARGET)


def exact_joint(cfg: WarpConfig, n_tokens: int, context: tuple = CONTEXT, target=TARGET) -> dict[tuple, float]:
    """P(first ``n_tokens`` emitted = s) = prod_j p_warped(s_j | context + s_<j), every s of positive probability."""
    law = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for s, p in law.items():
            row = warp_logits(target.logits(context + s), cfg).double()
            for x, q in enumerate((row / row.sum()).tolist()):  # float32 rows sum to 1 +- 1e-7; samplers normalise
                if q > 0.0:
                    nxt[s + (x,)] = p * q
        law = nxt
    return law


def law_pvalue(counts: Counter, law: dict[tuple, float], min_expected: float = 20.0) -> float:
    """Pearson chi-square p-value of ``counts`` against ``law`` (cells expected below ``min_expected`` draws pooled);
    0 when a sequence of probability 0 was drawn. Hundreds of cells expected at only 5-10 draws give the statistic a
    heavier tail than chi-square (a correct sampler then reached p = 3e-5 at 40k draws), hence 20."""
    if any(k not in law for k in counts):
        return 0.0
    return chi2_pvalue_of_cells(*pooled_cells(counts, law, min_expected))


def marginal(counts: Counter, n_tokens: int) -> Counter:
    out: Counter = Counter()
    for k, c in counts.items():
        out[k[:n_tokens]] += c
    return out


# ---------------------------------------------------------------------------------------------- tree shapes
def _draft_fn(before_root: tuple):
    """``build_tree_from_fn`` drafter: query ``i``'s sequence is everything before the root + its root->i path."""

    def fn(tokens, parents_mask, depths):
        return torch.stack(
            [
                DRAFTER.logprobs(before_root + tuple(tokens[parents_mask[i]].tolist()))
                for i in range(parents_mask.shape[0])
            ]
        )

    return fn


def _fanout(before_root: tuple, root: int, k: int, depth: int, choose) -> DraftTree:
    """Every node down to ``depth`` gets ``choose(draft_logprobs, k)`` children (breadth-first, so topological)."""
    tokens, parents, paths = [root], [-1], [(root,)]
    i = 0
    while i < len(tokens):
        if len(paths[i]) - 1 < depth:
            for x in choose(DRAFTER.logprobs(before_root + paths[i]), k):
                tokens.append(int(x))
                parents.append(i)
                paths.append(paths[i] + (int(x),))
        i += 1
    return DraftTree.from_parents(tokens, parents)


def _top_k(logprobs, k):
    return torch.topk(logprobs, k).indices.tolist()


def _sampler(seed: int):
    g = torch.Generator().manual_seed(seed)
    # With replacement: duplicate sibling tokens occur (the acceptance code skips a token already rejected).
    return lambda logprobs, k: torch.multinomial(logprobs.exp(), k, replacement=True, generator=g).tolist()


N_SAMPLED_TREES = 4  # per prefix; each round picks one at random, independently of the acceptance randomness

SHAPES = {
    # top_k = 1: a chain of the drafter's argmaxes (depth 4: the round's 3rd and 4th tokens are drafts).
    "chain": lambda b, r: [build_tree_from_fn(r, _draft_fn(b), 1, 4, 5)],
    # the decoder's EAGLE-2 dynamic tree (frontier = global top-k, re-ranked to total_tokens).
    "dynamic": lambda b, r: [build_tree_from_fn(r, _draft_fn(b), 3, 4, 14)],
    # every node has the drafter's top-3 as children, depth 3: 40 nodes.
    "fanout": lambda b, r: [_fanout(b, r, 3, 3, _top_k)],
    # candidates sampled from the drafter (the rule is exact conditionally on ANY tree chosen independently of
    # the target's randomness, so random drafts must pass too).
    "sampled": lambda b, r: [_fanout(b, r, 2, 3, _sampler(_seed(b + (r,), 50 + j))) for j in range(N_SAMPLED_TREES)],
}

_ROUNDS: dict[tuple, list] = {}
_WARPED: dict[tuple, list] = {}
_TREE_PREFIX: dict[int, tuple] = {}  # id(tree) -> tokens before its root (for the drafter-bonus mutant)


def round_inputs(shape: str, seq: tuple) -> list[tuple[DraftTree, torch.Tensor]]:
    """The tree(s) drafted below the root ``seq[-1]`` and the target's logits at every node (memoised)."""
    key = (shape, seq)
    if key not in _ROUNDS:
        before, root = seq[:-1], seq[-1]
        items = []
        for tree in SHAPES[shape](before, root):
            paths = [tuple(tree.tokens[tree.mask[i]].tolist()) for i in range(tree.size)]
            items.append((tree, torch.stack([TARGET.logits(before + p) for p in paths])))
            _TREE_PREFIX[id(tree)] = before
        _ROUNDS[key] = items
    return _ROUNDS[key]


def round_probs(shape: str, seq: tuple, cfg: WarpConfig) -> list[tuple[DraftTree, torch.Tensor]]:
    """:func:`round_inputs` with the logits warped by ``cfg`` (memoised: warping is a third of a round's cost, and
    ``accept_sampling`` is warp + ``accept_sampling_probs``, token-identically, see the copy test)."""
    key = (shape, seq, cfg)
    if key not in _WARPED:
        _WARPED[key] = [(tree, warp_logits(logits, cfg)) for tree, logits in round_inputs(shape, seq)]
    return _WARPED[key]


def drafter_row(tree: DraftTree, node: int) -> torch.Tensor:
    """The drafter's next-token distribution at ``node`` of a tree made by :func:`round_inputs`."""
    return DRAFTER.logprobs(_TREE_PREFIX[id(tree)] + tuple(tree.tokens[tree.mask[node]].tolist())).exp()


def sample_emitted(shape: str, cfg: WarpConfig, n_draws: int, n_tokens: int, seed: int):
    """Counts of the first ``n_tokens`` emitted tokens over ``n_draws`` independent generations (as many rounds as
    needed each) and how many first rounds accepted >= 3 drafts (so the law test really covers depth >= 3)."""
    gen = torch.Generator().manual_seed(seed)
    pick = random.Random(seed)
    counts: Counter = Counter()
    deep_rounds = 0
    for _ in range(n_draws):
        out: tuple = ()
        while len(out) < n_tokens:
            options = round_probs(shape, CONTEXT + out, cfg)
            tree, probs = options[pick.randrange(len(options))] if len(options) > 1 else options[0]
            acc = acceptance.accept_sampling_probs(tree, probs, gen)  # module lookup: mutants are patched there
            deep_rounds += (not out) and acc.num_accepted_drafts >= 3
            out += tuple(acc.tokens.tolist())
        counts[out[:n_tokens]] += 1
    return counts, deep_rounds


def joint_pvalues(shape: str, cfg: WarpConfig, n_draws: int = N_DRAWS, seed: int = 0):
    """p-values of the 3- and 4-token joint laws, and the number of deep first rounds."""
    counts, deep = sample_emitted(shape, cfg, n_draws, 4, seed)
    p4 = law_pvalue(counts, exact_joint(cfg, 4))
    p3 = law_pvalue(marginal(counts, 3), exact_joint(cfg, 3))
    return p3, p4, deep


# --------------------------------------------------------------------------------------- the harness itself
def test_warp_matches_hand_computed_case():
    """The reference laws use the product's warp; pin it to numbers computed by hand."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])
    # T = 0.5 -> [4, 2, 0, -2, 6]; top-3 keeps tokens 4, 0, 1 with softmax 1 : e^-2 : e^-4 (over 1 + e^-2 + e^-4);
    # top-p 0.9 drops the ascending prefix with mass <= 0.1, i.e. token 1 (0.0159; adding token 0 gives 0.133).
    got = warp_logits(logits, WarpConfig(temperature=0.5, top_k=3, top_p=0.9)).double()
    e = torch.exp(torch.tensor(-2.0, dtype=torch.float64))
    assert torch.allclose(got, torch.tensor([e / (1 + e), 0, 0, 0, 1 / (1 + e)], dtype=torch.float64), atol=1e-6)
    got = warp_logits(logits, WarpConfig(temperature=1.3)).double()
    w = torch.exp(logits.double() / 1.3)
    assert torch.allclose(got, w / w.sum(), atol=1e-6)
    # top-k keeps ties at the k-th value; -inf logits stay impossible.
    got = warp_logits(torch.tensor([1.0, 1.0, 0.5, -float("inf"), 1.0]), WarpConfig(temperature=1.0, top_k=2))
    assert got.tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 0.0, 1 / 3])


def test_exact_joint_is_a_distribution_with_zeros():
    for cfg in (WarpConfig(1.0), WarpConfig(0.7, top_k=3), WarpConfig(1.3, top_p=0.8)):
        law = exact_joint(cfg, 4)
        assert sum(law.values()) == pytest.approx(1.0, abs=1e-9)
        assert len(law) < V**4  # the target's zeros (and the warps) exclude sequences
    assert len(exact_joint(WarpConfig(1.0, top_k=2), 4)) == 2**4


def test_law_pvalue_accepts_the_law_and_rejects_a_nearby_one():
    law = exact_joint(WarpConfig(1.0), 3)
    keys = list(law)
    rng = torch.Generator().manual_seed(3)
    draws = torch.multinomial(
        torch.tensor([law[k] for k in keys], dtype=torch.float64), 20000, replacement=True, generator=rng
    )
    counts = Counter(keys[i] for i in draws.tolist())
    assert law_pvalue(counts, law) > ALPHA
    flat = {k: 0.9 * p + 0.1 / len(law) for k, p in law.items()}
    assert law_pvalue(counts, flat) < ALPHA
    impossible = next(s for s in ((a, b, c) for a in range(V) for b in range(V) for c in range(V)) if s not in law)
    assert law_pvalue(counts + Counter({impossible: 1}), law) == 0.0


def test_sampled_trees_have_duplicate_siblings():
    """The sampled shape exercises the walk's "token already rejected" skip."""
    dup = 0
    for s in [(), (0,), (1,), (2,)]:
        for tree, _ in round_inputs("sampled", CONTEXT + s):
            for i in range(tree.size):
                kids = tree.tokens[tree.children(i)].tolist()
                dup += len(kids) != len(set(kids))
    assert dup > 0


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_unmutated_copy_is_token_identical_to_product(shape):
    """The mutants differ from the product by their one switch only: without it the copy emits the same tokens
    from the same generator state, on every tree shape, with and without warping."""
    seqs = [CONTEXT + s for s in [(), (0,), (2, 4), (4, 4, 1)]]
    for cfg in (WarpConfig(1.0), WarpConfig(0.7, top_k=3, top_p=0.9)):
        for seq in seqs:
            for tree, logits in round_inputs(shape, seq):
                probs = warp_logits(logits, cfg)
                g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
                for _ in range(40):
                    a = accept_sampling(tree, logits, cfg, g1)
                    b = mutated_walk(tree, probs, g2)
                    assert a.tokens.tolist() == b.tokens.tolist()
                    assert a.accepted.tolist() == b.accepted.tolist()


# ------------------------------------------------------------------------------------- the acceptance laws
N_SLOW_DRAWS = 40000
_slow = pytest.mark.slow
LAW_CASES = [
    # default suite: every shape at T = 1, and all three warps at once on the full fan-out
    pytest.param("chain", WarpConfig(1.0), N_DRAWS),
    pytest.param("dynamic", WarpConfig(1.0), N_DRAWS),
    pytest.param("fanout", WarpConfig(1.0), N_DRAWS),
    pytest.param("sampled", WarpConfig(1.0), N_DRAWS),
    pytest.param("fanout", WarpConfig(0.7, top_k=3, top_p=0.9), N_DRAWS),
    # slow: one warp at a time, more draws
    pytest.param("dynamic", WarpConfig(0.7), N_SLOW_DRAWS, marks=_slow),
    pytest.param("fanout", WarpConfig(1.3), N_SLOW_DRAWS, marks=_slow),
    pytest.param("chain", WarpConfig(1.0, top_k=3), N_SLOW_DRAWS, marks=_slow),
    pytest.param("dynamic", WarpConfig(1.0, top_p=0.8), N_SLOW_DRAWS, marks=_slow),
    pytest.param("sampled", WarpConfig(1.3, top_k=4), N_SLOW_DRAWS, marks=_slow),
    pytest.param("dynamic", WarpConfig(1.0), N_SLOW_DRAWS, marks=_slow),
]


def _law_id(shape, cfg, n):
    return f"{shape}-T{cfg.temperature}-k{cfg.top_k}-p{cfg.top_p}-n{n}"


@pytest.mark.parametrize("shape,cfg,n_draws", LAW_CASES, ids=[_law_id(*c.values) for c in LAW_CASES])
def test_joint_law_of_first_tokens(shape, cfg, n_draws):
    p3, p4, deep = joint_pvalues(shape, cfg, n_draws)
    # The test is about deep tokens: first rounds must often accept >= 3 drafts (chains: ~7% of them).
    assert deep > n_draws // 20, deep
    assert p3 > ALPHA and p4 > ALPHA, (p3, p4)


# ------------------------------------------------------------------------------------------- the mutants
N_MUTANT_DRAWS = 3000  # every mutant's deviation is large; the product passes at the same size (None below)


@pytest.mark.parametrize("bug", [None, *MUTANTS])
def test_joint_law_rejects_mutants_on_dynamic_tree(bug, monkeypatch):
    """The decoder's own tree shape (EAGLE-2 dynamic, depth 4, siblings at every level) exposes every mutant."""
    if bug is not None:
        monkeypatch.setattr(acceptance, "accept_sampling_probs", make_mutant(bug, drafter_row))
    try:
        p3, p4, _ = joint_pvalues("dynamic", WarpConfig(1.0), n_draws=N_MUTANT_DRAWS, seed=1)
    except RuntimeError as e:  # residual_unclamped: torch.multinomial refuses the negative residual
        assert bug == "residual_unclamped", e
        return
    if bug is None:
        assert p3 > ALPHA and p4 > ALPHA, (p3, p4)
    else:
        assert min(p3, p4) < ALPHA, (bug, p3, p4)


# Bugs in how SIBLINGS are walked cannot show on a chain (one child per node): after its only draft is rejected
# the walk ends, so an un-renormalised mass or a residual that zeroes only the last rejection is never used again,
# and a uniform "shared by siblings" has nobody to share with. These need the fan-out / dynamic shapes.
CHAIN_BLIND = (
    "mass_not_subtracted",
    "no_renorm_from_depth3",
    "bonus_zeroes_last_rejected_only",
    "shared_uniform_siblings",
)


@pytest.mark.parametrize("bug", CHAIN_BLIND[:3])
def test_sibling_mutants_are_invisible_on_chains_by_construction(bug):
    """Why the chain shape alone is not enough: these mutants emit the product's very tokens on every chain."""
    for seq in [CONTEXT + s for s in [(), (0,), (2, 4)]]:
        for tree, logits in round_inputs("chain", seq):
            probs = warp_logits(logits, WarpConfig(1.0))
            g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
            for _ in range(50):
                assert (
                    accept_sampling_probs(tree, probs, g1).tokens.tolist()
                    == mutated_walk(tree, probs, g2, bug=bug).tokens.tolist()
                )


# Not blind by construction, but too weak to test: sampled trees (2 candidates drawn with replacement) often have
# one distinct child, and no_renorm_from_depth3 needs a rejected first child of two distinct ones below depth 2 on
# the walked path: p4 ~ 0.04 at 10k draws. The fan-out and dynamic shapes reject it at 3000.
LOW_POWER = {("no_renorm_from_depth3", "sampled")}
MUTANT_SHAPE_CASES = [
    (bug, shape)
    for shape in ("chain", "fanout", "sampled")
    for bug in MUTANTS
    if not (shape == "chain" and bug in CHAIN_BLIND) and (bug, shape) not in LOW_POWER
]


@pytest.mark.slow
@pytest.mark.parametrize("bug,shape", MUTANT_SHAPE_CASES)
def test_joint_law_rejects_mutants_on_other_shapes(bug, shape, monkeypatch):
    monkeypatch.setattr(acceptance, "accept_sampling_probs", make_mutant(bug, drafter_row))
    try:
        # Sampled trees often draw the same candidate twice (one effective child), so sibling bugs need more draws.
        p3, p4, _ = joint_pvalues(shape, WarpConfig(1.0), n_draws=10000, seed=2)
    except RuntimeError as e:
        assert bug == "residual_unclamped", e
        return
    assert min(p3, p4) < ALPHA, (bug, shape, p3, p4)


# ------------------------------------------------------------------------------------ end to end (mocks)
def _cache_ids(cache) -> list[int]:
    return cache.layers[0].keys[0, 0, :, 0].long().tolist() if cache.get_seq_length() else []


def _append_ids(cache, ids) -> None:
    val = torch.tensor(ids, dtype=torch.float32)[None, None, :, None]
    cache.update(val, val, 0)


class TableTargetAdapter:
    """The :class:`~specvlm_lit.target.TargetAdapter` surface the decoder uses, backed by :data:`TARGET`.

    Its "KV cache" is a real ``DynamicCache`` whose keys hold the token ids (so the decoder's own compaction and
    cropping run on it); every logit row is looked up from the exact token sequence the row conditions on, read from
    the cache and the tree mask, so a wrong mask, position or compaction changes the law.
    """

    device = torch.device("cpu")
    dtype = torch.float32
    vocab_size = V
    hidden_size = V
    image_token_id = V + 10  # never in a prompt
    visual_token_ids = (image_token_id,)
    visual_token_mask = TargetAdapter.visual_token_mask  # the real rule, so the stub cannot drift from it

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    def embed_tokens(self, ids):
        return torch.nn.functional.one_hot(ids.long(), V).float()

    def embed(self, ids, image_features=None):
        return self.embed_tokens(ids)

    def lm_head(self, hidden):
        return hidden  # the drafter's hidden states ARE its log-probs

    def forward(self, ids, image_features=None, past_key_values=None, use_cache=False, logits_to_keep=0):
        prefix = tuple(_cache_ids(past_key_values)) if past_key_values is not None else ()
        new = ids[0].tolist()
        rows = [TARGET.logits(prefix + tuple(new[: t + 1])) for t in range(len(new))]
        if past_key_values is not None:
            _append_ids(past_key_values, new)
        return SimpleNamespace(logits=torch.stack(rows)[None], hidden=torch.zeros(1, len(new), V))

    def tree_forward(self, input_ids, position_ids, tree_mask, past_key_values):
        prefix = tuple(_cache_ids(past_key_values))
        tokens = input_ids[0]
        depths = tree_mask.sum(1) - 1
        assert position_ids[0].tolist() == (len(prefix) + depths).tolist(), "positions must be prefix + depth"
        rows = [TARGET.logits(prefix + tuple(tokens[tree_mask[i]].tolist())) for i in range(tokens.numel())]
        _append_ids(past_key_values, tokens.tolist())
        return SimpleNamespace(logits=torch.stack(rows)[None], hidden=torch.zeros(1, tokens.numel(), V))


class TableDrafter:
    """EAGLE-style drafter stub backed by :data:`DRAFTER`: row ``t`` carries token ``x_{t+1}``; it reads the token
    ids its rows see (cache + attention mask) and returns the drafter's log-probs for that exact sequence."""

    compressor = None

    def __init__(self, first_prompt_token: int):
        self.first = first_prompt_token

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    def __call__(self, token_embeds, features, position_ids, attention_mask=None, past_key_values=None, use_cache=True):
        cache = past_key_values
        past = cache.get_seq_length()
        new = token_embeds[0].argmax(-1).tolist()
        _append_ids(cache, new)
        ids = _cache_ids(cache)
        T = len(new)
        if attention_mask is None:
            visible = torch.arange(past + T)[None, :] <= (torch.arange(T) + past)[:, None]
        else:
            visible = attention_mask[0, 0] == 0
        rows = [
            DRAFTER.logprobs((self.first,) + tuple(ids[j] for j in visible[i].nonzero().flatten().tolist()))
            for i in range(T)
        ]
        return SimpleNamespace(hidden=torch.stack(rows)[None], past_key_values=cache)


def decoder_counts(tree: TreeConfig, cfg: WarpConfig, max_new: int, n_draws: int, seed: int):
    """Counts of the first 4 new tokens of ``n_draws`` ``SpeculativeDecoder.generate`` calls, and how many first
    verification rounds accepted >= 3 drafts."""
    dec = SpeculativeDecoder(TableTargetAdapter(), TableDrafter(CONTEXT[0]), tree, cfg)
    ids = torch.tensor([CONTEXT])
    gen = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    deep = 0
    for _ in range(n_draws):
        res = dec.generate(ids, max_new_tokens=max_new, generator=gen)
        counts[tuple(res.tokens.tolist()[:4])] += 1
        deep += res.stats.accepted_drafts[0] >= 3
    return counts, deep


E2E_TREE = TreeConfig(top_k=3, depth=3, total_tokens=14, clip_to_budget=False)  # round 1 = new tokens 2..4
N_E2E_DRAWS = 2000


def _check_decoder_law(tree, cfg, max_new, n_draws, seed):
    counts, deep = decoder_counts(tree, cfg, max_new, n_draws, seed)
    return law_pvalue(marginal(counts, 3), exact_joint(cfg, 3)), law_pvalue(counts, exact_joint(cfg, 4)), deep


def test_decoder_joint_law_of_first_four_tokens():
    """Token 1 comes from the prefill, tokens 2-4 from the first tree round (depths 1-3) or later rounds."""
    p3, p4, deep = _check_decoder_law(E2E_TREE, WarpConfig(1.0), 4, N_E2E_DRAWS, seed=0)
    assert deep > N_E2E_DRAWS // 5, deep
    assert p3 > ALPHA and p4 > ALPHA, (p3, p4)


@pytest.mark.parametrize("bug", ["accept_positive_from_3rd", "bonus_ignores_rejections"])
def test_decoder_joint_law_rejects_mutants(bug, monkeypatch):
    """The decoder reaches the patched routine (it calls accept_sampling -> accept_sampling_probs) and the
    end-to-end law sees a bug that only touches the round's 3rd token and a bonus-token bug. (At 600 draws most
    4-token cells are pooled; the slow variant below runs every mutant at 3000.)"""
    monkeypatch.setattr(acceptance, "accept_sampling_probs", make_mutant(bug))
    p3, p4, _ = _check_decoder_law(E2E_TREE, WarpConfig(1.0), 4, 600, seed=0)
    assert p4 < ALPHA, (bug, p3, p4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tree,cfg,max_new",
    [
        # the decoder's defaults shape: clip_to_budget, depth 7 clipped to 3 for the first round of 5 new tokens
        (TreeConfig(top_k=2, depth=7, total_tokens=20), WarpConfig(0.7, top_k=3), 5),
        (E2E_TREE, WarpConfig(1.3, top_p=0.8), 4),
        (TreeConfig(top_k=1, depth=4, total_tokens=5, clip_to_budget=False), WarpConfig(1.0), 4),
    ],
)
def test_decoder_joint_law_slow(tree, cfg, max_new):
    p3, p4, deep = _check_decoder_law(tree, cfg, max_new, 8000, seed=1)
    assert deep > 8000 // 20, deep
    assert p3 > ALPHA and p4 > ALPHA, (p3, p4)


@pytest.mark.slow
@pytest.mark.parametrize("bug", [b for b in MUTANTS if b != "bonus_from_drafter"])
def test_decoder_joint_law_rejects_mutants_slow(bug, monkeypatch):
    monkeypatch.setattr(acceptance, "accept_sampling_probs", make_mutant(bug))
    try:
        p3, p4, _ = _check_decoder_law(E2E_TREE, WarpConfig(1.0), 4, 3000, seed=2)
    except RuntimeError as e:
        assert bug == "residual_unclamped", e
        return
    assert min(p3, p4) < ALPHA, (bug, p3, p4)


# -------------------------------------------------------------------------------- end to end (tiny LLaVA)
@pytest.mark.slow
def test_decoder_joint_law_with_tiny_llava_target():
    """A real (random tiny LLaVA) target verifying real tree forwards; top-k 3 keeps the 4-token table at 81 cells.
    Exact law from target forwards over every prefix in the warped support."""
    from tests.test_speculative import OracleDrafter, _inputs, get_target

    adapter = get_target("peaked")  # sharp rows: the accepted path often runs through the drafted frontier
    ids, _ = _inputs(adapter, [], 4, 21)
    cfg = WarpConfig(1.0, top_k=3)
    law = {(): 1.0}
    for _ in range(4):
        nxt = {}
        for s, p in law.items():
            full = torch.cat([ids, torch.tensor([s], dtype=torch.long).reshape(1, -1)], 1)
            row = warp_logits(adapter.forward(full).logits[0, -1], cfg).double()
            nxt.update({s + (x,): p * q for x, q in enumerate((row / row.sum()).tolist()) if q > 0})
        law = nxt
    # 21 pool nodes, all kept: depth 2 is full, depth 3 hangs under the frontier (top-3 depth-2 nodes).
    tree = TreeConfig(top_k=3, depth=3, total_tokens=22, clip_to_budget=False)
    dec = SpeculativeDecoder(adapter, OracleDrafter(adapter, ids, noise=0.2), tree, cfg)
    gen = torch.Generator().manual_seed(4)
    n = 2000
    counts: Counter = Counter()
    deep = 0
    for _ in range(n):
        res = dec.generate(ids, max_new_tokens=4, generator=gen)
        counts[tuple(res.tokens.tolist())] += 1
        deep += res.stats.accepted_drafts[0] >= 3
    assert deep > n // 5, deep
    law3: dict = {}
    for s, p in law.items():
        law3[s[:3]] = law3.get(s[:3], 0.0) + p
    p3, p4 = law_pvalue(marginal(counts, 3), law3), law_pvalue(counts, law)
    assert p3 > ALPHA and p4 > ALPHA, (p3, p4)
