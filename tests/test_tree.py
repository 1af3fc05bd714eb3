"""Tests for the EAGLE-2 draft-tree bookkeeping (specvlm_lit.decoding.tree)."""

from __future__ import annotations

import pytest
import torch

from specvlm_lit.decoding.tree import DraftTree, TreeBuilder, build_tree_from_fn, chain_tree

V = 17


# ---------------------------------------------------------------------------
# Stub drafters: log-probs are a deterministic function of the path, so the
# tree depends only on the algorithm (and a wrong mask would feed the stub a
# wrong path, which the reference comparison below would catch).
# ---------------------------------------------------------------------------


def _path_seed(path, salt=0):
    h = 1469598103 + salt
    for t in path:
        h = (h * 1000003 + int(t) + 1) % (2**61 - 1)
    return h


def path_logprobs(path, salt=0, vocab=V):
    g = torch.Generator().manual_seed(_path_seed(path, salt))
    return torch.log_softmax(torch.randn(vocab, generator=g) * 2.0, dim=-1)


def make_draft_fn(salt=0, vocab=V, transform=None):
    """draft_fn following build_tree_from_fn's contract: query i's path is
    tokens[parents_mask[i]] (root first)."""

    def fn(tokens, parents_mask, depths):
        assert parents_mask.shape[1] == tokens.numel()
        m = parents_mask.shape[0]
        rows = []
        for i in range(m):
            path = tokens[parents_mask[i]].tolist()
            assert len(path) == int(depths[i]) + 1  # path length = depth + 1
            lp = path_logprobs(path, salt, vocab)
            rows.append(transform(lp, path) if transform else lp)
        return torch.stack(rows)

    return fn


def reference_tree(root, k, depth, total, salt=0, vocab=V):
    """Naive, list-based EAGLE-2 expansion, written independently of the
    implementation. Returns list of (path_tuple, score) for kept nodes in pool
    order (path excludes the root)."""
    k = min(k, vocab)

    def topk(path):
        lp = path_logprobs(path, salt, vocab).tolist()
        order = sorted(range(vocab), key=lambda t: (-lp[t], t))[:k]
        return [(t, lp[t]) for t in order]

    pool = []  # (path tuple without root, score)
    for t, s in topk((root,)):
        pool.append(((t,), s))
    frontier = list(range(len(pool)))
    for _ in range(depth - 1):
        start = len(pool)
        for fi in frontier:
            fpath, fscore = pool[fi]
            for t, s in topk((root,) + fpath):
                pool.append((fpath + (t,), fscore + s))
        new = list(range(start, len(pool)))
        new.sort(key=lambda i: (-pool[i][1], i))
        frontier = new[:k]
    ranked = sorted(range(len(pool)), key=lambda i: (-pool[i][1], i))
    keep = sorted(ranked[: total - 1])
    return [pool[i] for i in keep]


def node_path(tree, i):
    """Node indices root -> i, by walking parents."""
    out = []
    while i >= 0:
        out.append(i)
        i = int(tree.parents[i])
    return out[::-1]


def check_invariants(tree: DraftTree):
    n = tree.size
    parents = tree.parents.tolist()
    assert parents[0] == -1
    assert int(tree.depths[0]) == 0
    for i in range(1, n):
        # closure under parent + topological order
        assert 0 <= parents[i] < i
        assert int(tree.depths[i]) == int(tree.depths[parents[i]]) + 1
    # siblings are distinct tokens
    for i in range(n):
        kids = tree.children(i).tolist()
        assert kids == sorted(kids)
        assert kids == [j for j in range(n) if parents[j] == i]
        toks = [int(tree.tokens[j]) for j in kids]
        assert len(set(toks)) == len(toks)
    # mask == ancestor-or-self, computed by walking parents
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        expected[i, node_path(tree, i)] = True
    assert torch.equal(tree.mask, expected)
    # positions == prefix_len + depth
    for prefix_len in (0, 7):
        pos = tree.position_ids(prefix_len)
        assert pos.shape == (1, n)
        assert torch.equal(pos[0], tree.depths + prefix_len)
    # paths: one per leaf, each root -> leaf, padded with -1
    leaves = [i for i in range(n) if i not in set(parents)]
    max_depth = int(tree.depths.max())
    assert tree.paths.shape == (len(leaves), max_depth + 1)
    ends = []
    for row in tree.paths.tolist():
        real = [x for x in row if x >= 0]
        assert row == real + [-1] * (len(row) - len(real))  # padding only at the end
        assert real == node_path(tree, real[-1])  # starts at root, parent chain
        ends.append(real[-1])
    assert ends == leaves
    # scores: root 0, never above the parent's
    assert float(tree.scores[0]) == 0.0


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


CONFIGS = [
    (1, 1, 2),
    (3, 1, 10),
    (2, 3, 100),
    (4, 4, 20),
    (5, 3, 12),
    (8, 5, 60),
    (10, 6, 60),
    (3, 6, 1000),
]


@pytest.mark.parametrize("k,depth,total", CONFIGS)
def test_matches_reference_and_invariants(k, depth, total):
    root = 3
    tree = build_tree_from_fn(root, make_draft_fn(), k, depth, total)
    check_invariants(tree)
    possible = k + (depth - 1) * k * k
    assert tree.size == min(total, 1 + possible)
    ref = reference_tree(root, k, depth, total)
    assert tree.size == len(ref) + 1
    got = [tuple(int(tree.tokens[j]) for j in node_path(tree, i)[1:]) for i in range(1, tree.size)]
    assert got == [p for p, _ in ref]
    torch.testing.assert_close(tree.scores[1:], torch.tensor([s for _, s in ref]), rtol=1e-5, atol=1e-5)
    assert int(tree.tokens[0]) == root


@pytest.mark.parametrize("k,depth,total", [(4, 4, 20), (6, 5, 30), (3, 3, 7)])
def test_kept_nodes_are_top_scores(k, depth, total):
    b = TreeBuilder(k, depth, total)
    fn = make_draft_fn(salt=11)
    root = 5
    frontier = b.start(root, fn(torch.tensor([root]), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1))[0])
    while frontier is not None:
        toks = torch.cat([torch.tensor([root]), b.pool_tokens[frontier.draft_pool_indices]])
        pm = torch.cat([torch.ones(frontier.size, 1, dtype=torch.bool), frontier.draft_mask], 1)
        frontier = b.expand(fn(toks, pm, frontier.depths))
    tree = b.build()
    best = torch.sort(b.pool_scores, descending=True).values[: total - 1]
    assert torch.equal(torch.sort(tree.scores[1:], descending=True).values, best)
    # every pool node not kept scores no better than the worst kept one
    assert float(tree.scores[1:].min()) >= float(best[-1])


def test_frontier_layout():
    k, depth = 3, 4
    b = TreeBuilder(k, depth, 50)
    fn = make_draft_fn(salt=3)
    root = 1
    frontier = b.start(root, path_logprobs([root], 3))
    prev = None
    level = 1
    seen_slots = []
    while frontier is not None:
        m = frontier.size
        P = b.pool_tokens.numel()
        assert m == k
        assert torch.equal(frontier.depths, torch.full((m,), level))
        assert torch.equal(frontier.position_ids(10)[0], torch.full((m,), 10 + level))
        assert torch.equal(frontier.tokens, b.pool_tokens[frontier.pool_indices])
        assert torch.equal(frontier.scores, b.pool_scores[frontier.pool_indices])
        assert torch.equal(frontier.parent_pool_indices, b.pool_parents[frontier.pool_indices])
        # pool_mask rows == ancestors-or-self by walking pool parents
        assert frontier.pool_mask.shape == (m, P)
        for i, pi in enumerate(frontier.pool_indices.tolist()):
            anc = []
            while pi >= 0:
                anc.append(pi)
                pi = int(b.pool_parents[pi])
            exp = torch.zeros(P, dtype=torch.bool)
            exp[anc] = True
            assert torch.equal(frontier.pool_mask[i], exp)
        # draft slots: earlier frontiers then this one, mask restricted to them
        seen_slots += frontier.pool_indices.tolist()
        assert frontier.draft_pool_indices.tolist() == seen_slots
        assert torch.equal(frontier.draft_mask, frontier.pool_mask[:, frontier.draft_pool_indices])
        # ancestors are always among draft slots (nothing un-forwarded needed)
        assert int(frontier.draft_mask.sum()) == int(frontier.pool_mask.sum())
        assert torch.equal(frontier.draft_mask[:, -m:], torch.eye(m, dtype=torch.bool))
        # parent_rows index into the previous forward's rows
        if prev is None:
            assert torch.equal(frontier.parent_rows, torch.full((m,), -1))
            assert torch.equal(frontier.parent_pool_indices, torch.full((m,), -1))
        else:
            assert torch.equal(prev.pool_indices[frontier.parent_rows], frontier.parent_pool_indices)
        toks = torch.cat([torch.tensor([root]), b.pool_tokens[frontier.draft_pool_indices]])
        pm = torch.cat([torch.ones(m, 1, dtype=torch.bool), frontier.draft_mask], 1)
        prev = frontier
        frontier = b.expand(fn(toks, pm, frontier.depths))
        level += 1
    assert level == depth
    assert b.done
    with pytest.raises(RuntimeError):
        b.expand(torch.zeros(k, V))


def test_chain_k1_matches_greedy_draft():
    root = 2
    tree = build_tree_from_fn(root, make_draft_fn(), 1, 6, 100)
    path = [root]
    for _ in range(6):
        path.append(int(path_logprobs(path).argmax()))
    chain = chain_tree(path)
    check_invariants(chain)
    check_invariants(tree)
    for name in ("tokens", "parents", "depths", "mask", "paths"):
        assert torch.equal(getattr(tree, name), getattr(chain, name)), name
    assert chain.paths.tolist() == [list(range(7))]
    # total_tokens truncates the chain
    short = build_tree_from_fn(root, make_draft_fn(), 1, 6, 3)
    assert short.tokens.tolist() == path[:3]


def test_chain_tree_basic():
    t = chain_tree(torch.tensor([9]))
    assert t.size == 1 and t.paths.tolist() == [[0]] and t.mask.tolist() == [[True]]
    t = chain_tree([4, 5, 6], scores=[0.0, -1.0, -2.5])
    assert t.parents.tolist() == [-1, 0, 1]
    assert t.scores.tolist() == [0.0, -1.0, -2.5]
    assert t.children(0).tolist() == [1] and t.children(2).tolist() == []


def test_depth_one_and_vocab_smaller_than_k():
    b = TreeBuilder(4, 1, 10)
    assert b.start(0, torch.log_softmax(torch.randn(V, generator=torch.Generator().manual_seed(0)), -1)) is None
    t = b.build()
    check_invariants(t)
    assert t.size == 5 and t.depths.tolist() == [0, 1, 1, 1, 1]
    # top_k larger than the vocabulary: each node proposes all 3 tokens, the
    # frontier is still the global top-5 once the pool allows it.
    tree = build_tree_from_fn(0, make_draft_fn(vocab=3), 5, 3, 100)
    check_invariants(tree)
    assert tree.size == 1 + 3 + 3 * 3 + 5 * 3


@pytest.mark.parametrize("kind", ["uniform", "onehot", "positive"])
def test_closure_with_ties_and_unnormalised_scores(kind):
    """Equal scores (uniform / -inf) and positive pseudo log-probs must not
    break parent closure or topological order."""

    def transform(lp, path):
        if kind == "uniform":
            return torch.full_like(lp, -torch.log(torch.tensor(float(lp.numel()))).item())
        if kind == "onehot":
            out = torch.full_like(lp, -float("inf"))
            out[int(lp.argmax())] = 0.0
            return out
        return lp + 3.0  # "log-probs" > 0: children can out-score parents

    for k, depth, total in [(3, 4, 9), (4, 3, 11), (2, 5, 6), (5, 4, 40)]:
        tree = build_tree_from_fn(1, make_draft_fn(transform=transform), k, depth, total)
        check_invariants(tree)
        assert tree.size == min(total, 1 + k + (depth - 1) * k * k)


def test_determinism():
    a = build_tree_from_fn(7, make_draft_fn(salt=5), 5, 5, 40)
    b = build_tree_from_fn(7, make_draft_fn(salt=5), 5, 5, 40)
    for name in ("tokens", "parents", "depths", "mask", "paths", "scores"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_from_parents_and_to():
    t = DraftTree.from_parents([0, 1, 2, 3, 4], [-1, 0, 0, 1, 1])
    check_invariants(t)
    assert t.paths.tolist() == [[0, 2, -1], [0, 1, 3], [0, 1, 4]]
    assert t.num_leaves == 3 and t.max_depth == 2
    t2 = t.to("cpu")
    assert torch.equal(t2.mask, t.mask)
    with pytest.raises(ValueError, match="parents"):
        DraftTree.from_parents([0, 1, 2], [-1, 2, 0])  # not topological
    with pytest.raises(ValueError, match="parents\\[0\\]"):
        DraftTree.from_parents([0, 1], [0, 0])
    with pytest.raises(ValueError):
        DraftTree.from_parents([], [])


def test_argument_validation():
    with pytest.raises(ValueError, match="top_k.*0"):
        TreeBuilder(0, 3, 10)
    with pytest.raises(ValueError, match="depth.*0"):
        TreeBuilder(2, 0, 10)
    with pytest.raises(ValueError, match="total_tokens.*1"):
        TreeBuilder(2, 3, 1)
    with pytest.raises(ValueError, match="top_k"):
        TreeBuilder(2.5, 3, 10)
    with pytest.raises(ValueError, match="depth"):
        TreeBuilder(2, True, 10)
    b = TreeBuilder(2, 3, 10)
    with pytest.raises(RuntimeError):
        b.expand(torch.zeros(2, V))
    with pytest.raises(RuntimeError):
        b.build()
    with pytest.raises(ValueError, match="root_logprobs"):
        b.start(0, torch.zeros(2, V))
    f = b.start(0, torch.log_softmax(torch.arange(V, dtype=torch.float), -1))
    assert f.size == 2
    with pytest.raises(ValueError, match="frontier_logprobs"):
        b.expand(torch.zeros(3, V))
    with pytest.raises(ValueError, match="frontier_logprobs"):
        b.expand(torch.zeros(2, V + 1))
    # build before reaching depth is allowed and consistent
    check_invariants(b.build())


# ---------------------------------------------------------------------------
# Batched builder
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k,depth,total", [(4, 4, 20), (3, 5, 60), (2, 1, 5), (5, 3, 2)])
def test_batched_builder_equals_one_builder_per_row(k, depth, total):
    """B trees grown together (one [B, m, V] step per level) equal the trees a TreeBuilder grows for each row
    alone: same tokens, parents, depths, scores and masks; every batched tree is a valid tree (its mask is the
    ancestor-or-self relation of its parents, so the kept set is closed under parent)."""
    from specvlm_lit.decoding.tree import BatchedTreeBuilder

    roots = [5, 0, 11]
    fns = [make_draft_fn(salt=s) for s in (1, 2, 3)]
    singles = []
    for root, fn in zip(roots, fns):
        singles.append(build_tree_from_fn(root, fn, k, depth, total))
    bb = BatchedTreeBuilder(k, depth, total)
    lp = torch.stack(
        [fn(torch.tensor([r]), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1)) for r, fn in zip(roots, fns)]
    )
    frontier = bb.start(torch.tensor(roots), lp.reshape(3, -1))
    while frontier is not None:
        rows = []
        for b, fn in enumerate(fns):
            toks = torch.cat([torch.tensor([roots[b]]), bb.pool_tokens[b][frontier.draft_pool_indices[b]]])
            pm = torch.cat([torch.ones(frontier.size, 1, dtype=torch.bool), frontier.draft_mask[b]], 1)
            rows.append(fn(toks, pm, frontier.depths[b]))
        frontier = bb.expand(torch.stack(rows))
    trees = bb.build()
    for b, single in enumerate(singles):
        for name in ("tokens", "parents", "depths", "mask"):
            assert torch.equal(getattr(trees, name)[b], getattr(single, name)), (b, name)
        torch.testing.assert_close(trees.scores[b], single.scores)
        again = DraftTree.from_parents(trees.tokens[b], trees.parents[b])
        assert torch.equal(again.mask, trees.mask[b]) and torch.equal(again.depths, trees.depths[b])


def test_ancestor_mask_matches_the_level_by_level_construction():
    from specvlm_lit.decoding.tree import ancestor_mask

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 9, 40):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        tree = DraftTree.from_parents(torch.arange(n), parents)
        got = ancestor_mask(torch.tensor([parents]), max(tree.max_depth, 1))[0]
        assert torch.equal(got, tree.mask), n
