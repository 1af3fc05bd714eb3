"""Tests for lossless draft-tree acceptance (specvlm_lit.decoding.acceptance)."""

from __future__ import annotations

import pytest
import torch

from specvlm_lit.decoding.acceptance import (
    Acceptance,
    WarpConfig,
    accept_greedy,
    accept_sampling,
    accept_sampling_probs,
    truncate_at_eos,
    warp_logits,
    warp_scores,
)
from specvlm_lit.decoding.tree import DraftTree, build_tree_from_fn, chain_tree
from tests.helpers import chi2_pvalue_of_cells


@pytest.fixture(autouse=True)
def _single_thread():
    """These tests run thousands of ops on tiny tensors; on a busy 2-core box
    OpenMP wake-ups for e.g. a [9, 6] softmax can cost milliseconds each, so
    run single-threaded (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def node_tokens(tree: DraftTree, i: int):
    """Tokens root -> node i (mask row is ancestor-or-self, ascending)."""
    return tree.tokens[tree.mask[i]].tolist()


def random_tree(root, n, vocab, gen, prefer=None, p_prefer=0.0):
    """Random topologically ordered tree with distinct sibling tokens.
    ``prefer(node_path) -> token`` is used with probability p_prefer."""
    tokens, parents, paths = [root], [-1], [[root]]
    used = {0: set()}
    for i in range(1, n):
        # parent among existing nodes that still have an unused token
        cands = [j for j in range(i) if len(used[j]) < vocab]
        p = cands[int(torch.randint(len(cands), (1,), generator=gen))]
        free = [t for t in range(vocab) if t not in used[p]]
        t = None
        if prefer is not None and float(torch.rand(1, generator=gen)) < p_prefer:
            want = prefer(paths[p])
            if want not in used[p]:
                t = want
        if t is None:
            t = free[int(torch.randint(len(free), (1,), generator=gen))]
        used[p].add(t)
        used[i] = set()
        tokens.append(t)
        parents.append(p)
        paths.append(paths[p] + [t])
    return DraftTree.from_parents(tokens, parents)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with zero expected
    probability must have zero counts (asserted)."""
    counts = counts.double().reshape(-1)
    probs = probs.double().reshape(-1)
    probs = probs / probs.sum()
    zero = probs <= 0
    assert int(counts[zero].sum()) == 0, f"impossible outcomes observed: {counts[zero]}"
    n = counts.sum()
    e = n * probs[~zero]
    o = counts[~zero]
    return chi2_pvalue_of_cells(o.tolist(), e.tolist())


ALPHA = 1e-3


# ---------------------------------------------------------------------------
# WarpConfig / warp
# ---------------------------------------------------------------------------


def test_warp_config_validation():
    assert WarpConfig().greedy
    assert not WarpConfig(temperature=0.7).greedy
    assert WarpConfig(temperature=1).temperature == 1.0
    for bad in (-0.1, float("nan"), float("inf"), "1.0", True):
        with pytest.raises(ValueError, match="temperature"):
            WarpConfig(temperature=bad)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="top_p.*" + (r"nan" if bad != bad else str(bad))):
            WarpConfig(temperature=1.0, top_p=bad)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            WarpConfig(temperature=1.0, top_k=bad)


def _hf_warp(logits, cfg):
    lp = pytest.importorskip("transformers.generation.logits_process")
    # Same conditions generate() uses to add each warper (non-beam sampling,
    # min_tokens_to_keep = 1).
    procs = []
    if cfg.temperature != 1.0:
        procs.append(lp.TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k != 0:
        procs.append(lp.TopKLogitsWarper(top_k=cfg.top_k, min_tokens_to_keep=1))
    if cfg.top_p < 1.0:
        procs.append(lp.TopPLogitsWarper(top_p=cfg.top_p, min_tokens_to_keep=1))
    scores = logits.float()
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    for p in procs:
        scores = p(ids, scores)
    return scores


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [0, 1, 5, 40])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.5, 1e-4])
def test_warp_matches_transformers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(1234)
    cfg = WarpConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    cases = [
        torch.randn(8, 32, generator=g) * 3,
        # many exact ties, to exercise boundary semantics
        torch.randint(0, 4, (8, 32), generator=g).float(),
        torch.randn(4, 1000, generator=g).to(torch.bfloat16),
    ]
    for logits in cases:
        ours = warp_scores(logits, cfg)
        ref = _hf_warp(logits, cfg)
        assert torch.equal(ours, ref)
        probs = warp_logits(logits, cfg)
        assert torch.equal(probs, torch.softmax(ref, dim=-1))
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]))


def test_warp_greedy_is_one_hot_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, -1.0, 5.0, 5.0]])
    p = warp_logits(logits, WarpConfig())
    assert p.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


# ---------------------------------------------------------------------------
# Greedy acceptance: hand-built cases
# ---------------------------------------------------------------------------

GV = 10


def logits_with_argmax(argmaxes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.rand(len(argmaxes), GV, generator=g)
    out[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return out


def hand_tree():
    #   0:5 -> 1:1 -> 3:3
    #              -> 4:4 -> 6:7
    #       -> 2:2 -> 5:6
    return DraftTree.from_parents([5, 1, 2, 3, 4, 6, 7], [-1, 0, 0, 1, 1, 2, 4])


def test_greedy_longest_match_and_bonus():
    tree = hand_tree()
    #                 node: 0  1  2  3  4  5  6
    logits = logits_with_argmax([1, 4, 6, 0, 7, 0, 9])
    acc = accept_greedy(tree, logits)
    assert isinstance(acc, Acceptance)
    assert acc.accepted.tolist() == [0, 1, 4, 6]
    assert acc.tokens.tolist() == [1, 4, 7, 9]
    assert acc.num_accepted_drafts == 3
    assert acc.last_node == 6 and acc.bonus_token == 9


def test_greedy_partial_match_picks_deepest():
    tree = hand_tree()
    # root->2 accepted, 2->6 accepted (node 5, a leaf); root->1 path rejected
    logits = logits_with_argmax([2, 4, 6, 0, 7, 8, 9])
    acc = accept_greedy(tree, logits)
    assert acc.accepted.tolist() == [0, 2, 5]
    assert acc.tokens.tolist() == [2, 6, 8]
    # stop in the middle of a path: 1 accepted, then argmax 9 matches no child
    acc = accept_greedy(tree, logits_with_argmax([1, 9, 0, 0, 0, 0, 0]))
    assert acc.accepted.tolist() == [0, 1]
    assert acc.tokens.tolist() == [1, 9]


def test_greedy_no_match_only_bonus():
    tree = hand_tree()
    acc = accept_greedy(tree, logits_with_argmax([8, 4, 6, 0, 7, 0, 9]))
    assert acc.accepted.tolist() == [0]
    assert acc.tokens.tolist() == [8]
    assert acc.num_accepted_drafts == 0
    # root-only tree
    acc = accept_greedy(chain_tree([3]), logits_with_argmax([4]))
    assert acc.accepted.tolist() == [0] and acc.tokens.tolist() == [4]


def test_greedy_ties_in_logits_use_first_argmax():
    tree = chain_tree([0, 2, 3])
    logits = torch.zeros(3, GV)
    logits[0, [2, 5]] = 1.0  # tie: first index (2) is greedy's choice
    logits[1, [1, 3]] = 1.0  # tie: greedy picks 1, so token 3 is rejected
    acc = accept_greedy(tree, logits)
    assert acc.tokens.tolist() == [2, 1]
    # duplicate sibling tokens (not produced by the builder): first wins
    dup = DraftTree.from_parents([0, 4, 4], [-1, 0, 0])
    acc = accept_greedy(dup, logits_with_argmax([4, 1, 2]))
    assert acc.accepted.tolist() == [0, 1] and acc.tokens.tolist() == [4, 1]


def test_greedy_with_eos():
    tree = hand_tree()
    eos = 4
    acc = accept_greedy(tree, logits_with_argmax([1, 4, 6, 0, 7, 0, 9]))
    toks, finished = truncate_at_eos(acc.tokens, eos, budget=100)
    assert toks.tolist() == [1, 4] and finished
    toks, finished = truncate_at_eos(acc.tokens, [eos, 1], budget=100)
    assert toks.tolist() == [1] and finished
    toks, finished = truncate_at_eos(acc.tokens, None, budget=3)
    assert toks.tolist() == [1, 4, 7] and finished


def test_shape_validation():
    tree = hand_tree()
    with pytest.raises(ValueError, match="tree.size"):
        accept_greedy(tree, torch.zeros(3, GV))
    with pytest.raises(ValueError, match="tree.size"):
        accept_sampling(tree, torch.zeros(3, GV), WarpConfig(1.0), torch.Generator())
    # [1, n, V] is accepted
    acc = accept_greedy(tree, logits_with_argmax([1, 4, 6, 0, 7, 0, 9])[None])
    assert acc.tokens.tolist() == [1, 4, 7, 9]


# ---------------------------------------------------------------------------
# Greedy acceptance: randomized equivalence with plain greedy decoding
# ---------------------------------------------------------------------------

RV = 11


def _h(seq, salt=0):
    h = 7 + salt
    for t in seq:
        h = (h * 1000003 + int(t) + 1) % (2**61 - 1)
    return h


def target_logits_fn(prefix):
    """Deterministic 'target model': logits depend on the last 3 tokens only
    (so drafts can be right) and are small integers, so exact ties are
    frequent - greedy must break them exactly like argmax does."""
    g = torch.Generator().manual_seed(_h(prefix[-3:]))
    return torch.randint(0, 4, (RV,), generator=g).float()


def plain_greedy(context, max_new, eos=None):
    seq, out = list(context), []
    while len(out) < max_new:
        t = int(torch.argmax(target_logits_fn(seq)))
        out.append(t)
        seq.append(t)
        if eos is not None and t == eos:
            break
    return out


def tree_target_logits(context_before_root, tree):
    return torch.stack([target_logits_fn(context_before_root + node_tokens(tree, i)) for i in range(tree.size)])


def test_greedy_random_trees_match_plain_greedy():
    g = torch.Generator().manual_seed(0)
    total_accepted = 0
    for _ in range(150):
        ctx = torch.randint(RV, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        n = int(torch.randint(1, 25, (1,), generator=g))

        def prefer(path, ctx=ctx):  # the right token, sometimes
            return int(torch.argmax(target_logits_fn(ctx[:-1] + path)))

        tree = random_tree(ctx[-1], n, RV, g, prefer=prefer, p_prefer=0.7)
        acc = accept_greedy(tree, tree_target_logits(ctx[:-1], tree))
        ref = plain_greedy(ctx, acc.tokens.numel())
        assert acc.tokens.tolist() == ref
        # accepted nodes are a root-first chain whose tokens are the drafts
        a = acc.accepted.tolist()
        assert a[0] == 0 and all(int(tree.parents[a[j]]) == a[j - 1] for j in range(1, len(a)))
        assert tree.tokens[a[1:]].tolist() == acc.tokens[:-1].tolist()
        # maximal: no child of the last accepted node carries the bonus token
        kids = tree.children(a[-1])
        assert acc.bonus_token not in tree.tokens[kids].tolist()
        total_accepted += acc.num_accepted_drafts
    assert total_accepted > 100  # the test actually exercises acceptance


def spec_generate_greedy(context, max_new, eos, k, depth, total, noise_seed):
    """Full speculative loop with a stub drafter (noisy target)."""
    seq, out = list(context), []
    steps = 0
    while True:
        steps += 1

        def draft_fn(tokens, parents_mask, depths, seq=seq):  # this round's sequence, bound now
            rows = []
            for i in range(parents_mask.shape[0]):
                prefix = seq[:-1] + tokens[parents_mask[i]].tolist()
                g = torch.Generator().manual_seed(_h(prefix, salt=noise_seed))
                rows.append(torch.log_softmax(target_logits_fn(prefix) + 1.5 * torch.rand(RV, generator=g), -1))
            return torch.stack(rows)

        tree = build_tree_from_fn(seq[-1], draft_fn, k, depth, total)
        acc = accept_greedy(tree, tree_target_logits(seq[:-1], tree))
        toks, finished = truncate_at_eos(acc.tokens, eos, max_new - len(out))
        out += toks.tolist()
        seq += toks.tolist()
        if finished:
            return out, steps


def test_greedy_full_loop_token_identical():
    g = torch.Generator().manual_seed(1)
    eos = 6  # emitted now and then by the stub target
    ended_by_eos = ended_by_budget = 0
    fewer_steps = 0
    for trial in range(12):
        ctx = torch.randint(RV - 1, (4,), generator=g).tolist()
        k, depth, total = [(1, 4, 5), (3, 4, 16), (4, 5, 30), (2, 6, 12)][trial % 4]
        max_new = 25
        out, steps = spec_generate_greedy(ctx, max_new, eos, k, depth, total, noise_seed=trial)
        ref = plain_greedy(ctx, max_new, eos)
        assert out == ref
        ended_by_eos += int(ref[-1] == eos)
        ended_by_budget += int(len(ref) == max_new and ref[-1] != eos)
        fewer_steps += int(steps < len(ref))
    assert ended_by_eos > 0 and ended_by_budget > 0
    assert fewer_steps > 0  # speculation actually saved target steps


# ---------------------------------------------------------------------------
# Sampling acceptance: distributional tests against a bigram target
# ---------------------------------------------------------------------------

SV = 6


def bigram_table(seed=0):
    g = torch.Generator().manual_seed(seed)
    P = torch.rand(SV, SV, generator=g) + 0.15
    # zero out a couple of entries per row (tokens the target never emits)
    for a in range(SV):
        P[a, (a + 1) % SV] = 0.0
        P[a, (3 * a + 4) % SV] = 0.0
    return P / P.sum(1, keepdim=True)


P_TABLE = bigram_table()
LOG_P = torch.log(P_TABLE)  # -inf where the target has zero probability
ROOT = 2


def bigram_logits(tree):
    # target at node i conditions on node i's token only
    return LOG_P[tree.tokens]


def sampling_trees():
    g = torch.Generator().manual_seed(42)
    zero_tok = int((P_TABLE[ROOT] == 0).nonzero()[0])
    return {
        # all 6 tokens as root children (incl. zero-probability ones) + depth 2-3
        "full_fanout": DraftTree.from_parents(
            [ROOT, 0, 1, 2, 3, 4, 5, 1, 2, 5, 0, 3, 4],
            [-1, 0, 0, 0, 0, 0, 0, 1, 1, 2, 4, 7, 7],
        ),
        "random": random_tree(ROOT, 14, SV, g),
        "chain_zero_first": chain_tree([ROOT, zero_tok, 1, 2]),
        "root_only": chain_tree([ROOT]),
    }


def second_tree(root):
    """Tree used for the *next* speculative step (deterministic per root)."""
    return random_tree(root, 6, SV, torch.Generator().manual_seed(100 + root))


def run_two_tokens(tree, cfg, n_trials, seed, probs_fn=None):
    """Counts of the first two tokens of the generated continuation, running
    a second speculative step when the first emits only one token."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(SV, SV, dtype=torch.long)
    first = torch.zeros(SV, dtype=torch.long)
    logits1 = bigram_logits(tree)
    logits2 = {a: (second_tree(a), bigram_logits(second_tree(a))) for a in range(SV)}
    for _ in range(n_trials):
        acc = accept_sampling(tree, logits1, cfg, gen)
        t = acc.tokens.tolist()
        assert acc.num_accepted_drafts == len(t) - 1
        if len(t) < 2:
            tree2, lg2 = logits2[t[0]]
            t.append(int(accept_sampling(tree2, lg2, cfg, gen).tokens[0]))
        first[t[0]] += 1
        counts[t[0], t[1]] += 1
    return first, counts


@pytest.mark.parametrize(
    "name,n_trials",
    [("full_fanout", 20000), ("random", 20000), ("chain_zero_first", 8000), ("root_only", 5000)],
)
def test_sampling_first_and_joint_match_target(name, n_trials):
    tree = sampling_trees()[name]
    cfg = WarpConfig(temperature=1.0)
    first, joint = run_two_tokens(tree, cfg, n_trials, seed=7)
    p1 = P_TABLE[ROOT]
    assert chi2_pvalue(first, p1) > ALPHA
    expected_joint = p1[:, None] * P_TABLE  # p(a|root) p(b|a)
    assert chi2_pvalue(joint, expected_joint) > ALPHA


def test_chi2_has_power():
    """Sanity check of the test itself: a slightly wrong distribution (or the
    classic bug of accepting the top draft whenever p(x) > 0) is rejected."""
    tree = sampling_trees()["full_fanout"]
    first, _ = run_two_tokens(tree, WarpConfig(temperature=1.0), 8000, seed=8)
    p1 = P_TABLE[ROOT]
    assert chi2_pvalue(first, p1) > ALPHA
    wrong = 0.85 * p1 + 0.15 * (p1 > 0).double() / int((p1 > 0).sum())
    assert chi2_pvalue(first, wrong) < ALPHA
    # always accepting the first positive-probability child
    bad_first = torch.zeros(SV, dtype=torch.long)
    kid = next(int(tree.tokens[c]) for c in tree.children(0) if float(p1[tree.tokens[c]]) > 0)
    bad_first[kid] = 8000
    with pytest.raises(AssertionError):
        assert chi2_pvalue(bad_first, p1) > ALPHA


def test_sampling_with_warping():
    """temperature + top-k + top-p: the emitted distribution is the warped
    one, and tokens outside the warped support never appear."""
    cfg = WarpConfig(temperature=0.7, top_k=4, top_p=0.8)
    warped = warp_logits(LOG_P, cfg)  # [SV, SV] warped bigram rows
    support = warped[ROOT] > 0
    tree = sampling_trees()["full_fanout"]
    root_kids = tree.tokens[tree.children(0)]
    assert (~support[root_kids]).any()  # the draft proposes excluded tokens
    assert int(support.sum()) < int((P_TABLE[ROOT] > 0).sum())  # warping removed something
    first, joint = run_two_tokens(tree, cfg, 15000, seed=11)
    assert chi2_pvalue(first, warped[ROOT]) > ALPHA
    assert chi2_pvalue(joint, warped[ROOT][:, None] * warped) > ALPHA


def test_sampling_emitted_tokens_respect_support_everywhere():
    cfg = WarpConfig(temperature=1.3, top_k=3, top_p=0.9)
    warped = warp_logits(LOG_P, cfg)
    gen = torch.Generator().manual_seed(5)
    g = torch.Generator().manual_seed(6)
    for _ in range(300):
        tree = random_tree(int(torch.randint(SV, (1,), generator=g)), 12, SV, g)
        acc = accept_sampling(tree, bigram_logits(tree), cfg, gen)
        seq = [int(tree.tokens[0])] + acc.tokens.tolist()
        for a, b in zip(seq, seq[1:]):
            assert float(warped[a, b]) > 0
        # accepted path is consistent with the emitted drafts
        a = acc.accepted.tolist()
        assert tree.tokens[a[1:]].tolist() == acc.tokens[:-1].tolist()


def test_sampling_deterministic_target_accepts_everything():
    # target: next = (a + 1) % SV with probability 1
    P = torch.zeros(SV, SV)
    P[torch.arange(SV), (torch.arange(SV) + 1) % SV] = 1.0
    tree = DraftTree.from_parents([0, 1, 3, 2, 5], [-1, 0, 0, 1, 1])
    probs = P[tree.tokens]
    for seed in range(20):
        acc = accept_sampling_probs(tree, probs, torch.Generator().manual_seed(seed))
        assert acc.accepted.tolist() == [0, 1, 3]
        assert acc.tokens.tolist() == [1, 2, 3]


def test_sampling_greedy_cfg_delegates_and_is_deterministic():
    tree = hand_tree()
    logits = logits_with_argmax([1, 4, 6, 0, 7, 0, 9])
    acc = accept_sampling(tree, logits, WarpConfig(temperature=0.0), torch.Generator().manual_seed(0))
    assert acc.tokens.tolist() == [1, 4, 7, 9]
    cfg = WarpConfig(temperature=1.0)
    lg = torch.randn(tree.size, GV, generator=torch.Generator().manual_seed(3))
    runs = [
        [accept_sampling(tree, lg, cfg, gen).tokens.tolist() for _ in range(50)]
        for gen in (torch.Generator().manual_seed(9), torch.Generator().manual_seed(9))
    ]
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------
# truncate_at_eos
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens,eos,budget,expected,finished",
    [
        ([5, 6, 7], 2, 10, [5, 6, 7], False),  # nothing to cut
        ([5, 2, 7], 2, 10, [5, 2], True),  # EOS kept, rest dropped
        ([2, 2, 7], 2, 10, [2], True),  # EOS first
        ([5, 6, 7], [9, 7, 6], 10, [5, 6], True),  # several EOS ids: first hit wins
        ([5, 6, 7, 8], 8, 3, [5, 6, 7], True),  # budget cut before the EOS
        ([5, 6, 7], 7, 3, [5, 6, 7], True),  # EOS exactly at the budget
        ([5, 6, 7], None, 3, [5, 6, 7], True),  # budget exactly used up
        ([5, 6, 7], None, 5, [5, 6, 7], False),
        ([5, 6, 7], [], 5, [5, 6, 7], False),
        ([5, 6, 7], 5, 0, [], True),  # no budget left
    ],
)
def test_truncate_at_eos(tokens, eos, budget, expected, finished):
    for t in (tokens, torch.tensor(tokens, dtype=torch.long)):
        for e in (eos, torch.tensor(eos) if eos is not None else None):
            out, fin = truncate_at_eos(t, e, budget)
            assert out.dtype == torch.long
            assert out.tolist() == expected
            assert fin is finished


def test_truncate_at_eos_validation():
    with pytest.raises(ValueError, match="budget"):
        truncate_at_eos([1, 2], 2, -1)
    with pytest.raises(ValueError, match="budget"):
        truncate_at_eos([1, 2], 2, 1.5)
