"""Draft-tree bookkeeping for EAGLE-2 style dynamic speculative decoding.

This module is *pure tensor code*: it never calls a model.  The decoding loop
owns the draft and target models and drives :class:`TreeBuilder` through an
incremental interface::

    builder = TreeBuilder(top_k, depth, total_tokens)
    frontier = builder.start(root_token, root_logprobs)      # depth-1 nodes
    while frontier is not None:
        logprobs = <ONE batched draft forward over frontier>   # [m, V]
        frontier = builder.expand(logprobs)                    # next level
    tree = builder.build()                                     # DraftTree

Vocabulary used throughout
--------------------------
* **root**: the last token produced by the target model.  It is already
  verified, sits at position ``prefix_len`` (``prefix_len`` = number of tokens
  *before* the root) and is always node 0 of the final tree.
* **pool**: every candidate node ever created by the builder, in creation
  order ("pool index").  Depth-1 nodes are pool indices ``0..k-1``; each
  expansion appends ``m * k`` children ordered by (parent's frontier row,
  child's draft rank).  The root is *not* in the pool.
* **frontier**: the nodes of the current level that get expanded next.  Only
  frontier nodes are ever fed to the drafter, so the ancestors of any node are
  always earlier frontier nodes (or the root).
* **draft slots**: the frontier nodes in the order they were fed to the
  drafter (all of level 1's frontier, then level 2's, ...).  If the caller
  appends each batched draft forward to its draft KV cache, draft slot ``j``
  is exactly the ``j``-th cached draft entry after the prefix.

Scores are cumulative draft log-probabilities (root = 0).  Because every
log-prob is ``<= 0`` a child never out-scores its parent, so "keep the best
``total_tokens - 1`` pool nodes" yields a set closed under "parent".  We make
this robust (ties, positive pseudo log-probs) by ranking on the running
minimum of the score along the ancestor chain and breaking ties by pool index;
since a parent always has a smaller pool index than its children, a parent
always ranks at least as high as any of its descendants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DraftTree",
    "Frontier",
    "TreeBuilder",
    "build_tree_from_fn",
    "chain_tree",
]


# ---------------------------------------------------------------------------
# DraftTree
# ---------------------------------------------------------------------------


@dataclass
class DraftTree:
    """A topologically ordered draft tree, root first.

    Attributes:
        tokens:  ``LongTensor [n]`` token id of each node; ``tokens[0]`` is the
            root (the last verified token).
        parents: ``LongTensor [n]`` index of each node's parent in this node
            list; ``-1`` for the root.  Always ``parents[i] < i`` (topological
            order), which is what lets a single forward pass with ``mask``
            evaluate every node.
        depths:  ``LongTensor [n]`` distance from the root (root = 0).
        mask:    ``BoolTensor [n, n]``; ``mask[i, j]`` is True iff node ``j``
            is an ancestor of node ``i`` or ``i`` itself.  Row ``i`` equals
            row ``parents[i]`` OR the one-hot of ``i``.  This is the tree
            attention mask for the target's verification forward (nodes also
            see the whole prefix, which the caller adds).
        paths:   ``LongTensor [num_leaves, max_depth + 1]``; one row per leaf
            (leaves in node order), listing node indices root -> leaf,
            right-padded with ``-1``.  Column ``d`` holds the depth-``d`` node.
        scores:  ``FloatTensor [n]`` cumulative draft log-prob (root 0).
    """

    tokens: Tensor
    parents: Tensor
    depths: Tensor
    mask: Tensor
    paths: Tensor
    scores: Tensor

    # -- construction -----------------------------------------------------

    @classmethod
    def from_parents(
        cls,
        tokens: Tensor | Sequence[int],
        parents: Tensor | Sequence[int],
        scores: Tensor | Sequence[float] | None = None,
    ) -> DraftTree:
        """Build a tree (depths, mask, paths) from tokens and parent indices.

        ``parents[0]`` must be ``-1`` and ``0 <= parents[i] < i`` for ``i > 0``
        (topological order).  ``scores`` defaults to zeros.  The result lives
        on the device of ``tokens`` (CPU for Python sequences); the structural
        work is done on CPU because trees are tiny (tens to hundreds of nodes)
        and it needs a few data-dependent loops.
        """
        device = tokens.device if isinstance(tokens, Tensor) else torch.device("cpu")
        tok = torch.as_tensor(tokens, dtype=torch.long).detach().cpu().reshape(-1)
        par = torch.as_tensor(parents, dtype=torch.long).detach().cpu().reshape(-1)
        n = tok.numel()
        if n < 1:
            raise ValueError("a DraftTree needs at least the root node (got 0 tokens)")
        if par.numel() != n:
            raise ValueError(f"tokens has {n} entries but parents has {par.numel()}")
        par_list = par.tolist()
        if par_list[0] != -1:
            raise ValueError(f"parents[0] must be -1 (root), got {par_list[0]}")
        depth_list = [0] * n
        for i in range(1, n):
            p = par_list[i]
            if not 0 <= p < i:
                raise ValueError(f"parents must be topologically ordered (0 <= parents[i] < i); got parents[{i}] = {p}")
            depth_list[i] = depth_list[p] + 1
        depths = torch.tensor(depth_list, dtype=torch.long)
        max_depth = max(depth_list)

        # Ancestor-or-self mask, one tensor op per depth level: every node of
        # level d copies its parent's row (already final, level d-1) and sets
        # its own diagonal bit.
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[0, 0] = True
        for d in range(1, max_depth + 1):
            idx = (depths == d).nonzero(as_tuple=True)[0]
            mask[idx] = mask[par[idx]]
            mask[idx, idx] = True

        # Leaves = nodes that are nobody's parent.  Each leaf's path is the set
        # of its ancestors-or-self; placing node j in column depths[j] puts
        # them in root->leaf order.
        is_parent = torch.zeros(n, dtype=torch.bool)
        is_parent[par[1:]] = True
        leaves = (~is_parent).nonzero(as_tuple=True)[0]
        paths = torch.full((leaves.numel(), max_depth + 1), -1, dtype=torch.long)
        rows, cols = mask[leaves].nonzero(as_tuple=True)
        paths[rows, depths[cols]] = cols

        if scores is None:
            sc = torch.zeros(n, dtype=torch.float32)
        else:
            sc = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
            if sc.numel() != n:
                raise ValueError(f"tokens has {n} entries but scores has {sc.numel()}")
        return cls(tok, par, depths, mask, paths, sc).to(device)

    def to(self, device: str | torch.device) -> DraftTree:
        """Return a copy with every tensor moved to ``device``."""
        return DraftTree(
            tokens=self.tokens.to(device),
            parents=self.parents.to(device),
            depths=self.depths.to(device),
            mask=self.mask.to(device),
            paths=self.paths.to(device),
            scores=self.scores.to(device),
        )

    # -- queries ----------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of nodes, root included."""
        return int(self.tokens.numel())

    @property
    def num_leaves(self) -> int:
        return int(self.paths.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.paths.shape[1]) - 1

    def position_ids(self, prefix_len: int) -> Tensor:
        """``LongTensor [1, n]`` = ``prefix_len + depth``.

        ``prefix_len`` is the number of tokens before the root, i.e. the
        root's own position; siblings share a position because they are
        alternative continuations of the same prefix.
        """
        return (self.depths + int(prefix_len)).unsqueeze(0)

    def children(self, i: int) -> Tensor:
        """Indices of node ``i``'s children, ascending (= draft-rank order)."""
        return (self.parents == int(i)).nonzero(as_tuple=True)[0]


def chain_tree(tokens: Tensor | Sequence[int], scores=None) -> DraftTree:
    """A linear draft (top_k = 1): ``tokens[0]`` is the root, each next token
    is the child of the previous one.  Useful for tests and for k=1 drafting."""
    tok = torch.as_tensor(tokens, dtype=torch.long)
    parents = torch.arange(-1, tok.numel() - 1, dtype=torch.long)
    return DraftTree.from_parents(tok, parents, scores)


# ---------------------------------------------------------------------------
# Frontier + TreeBuilder
# ---------------------------------------------------------------------------


@dataclass
class Frontier:
    """The ``m`` nodes the caller must feed to the drafter in ONE batched
    forward (``m = min(top_k, ...)``; all at the same depth).

    Attributes (``P`` = pool size so far, ``F`` = number of draft slots so
    far; both *include* this frontier):
        tokens:  ``LongTensor [m]`` input token ids.
        depths:  ``LongTensor [m]`` depth of each node (all equal to the
            level); position id = ``prefix_len + depth`` (see
            :meth:`position_ids`).
        scores:  ``FloatTensor [m]`` cumulative draft log-probs.
        pool_indices: ``LongTensor [m]`` the nodes' pool indices.
        parent_pool_indices: ``LongTensor [m]`` pool index of each node's
            parent, ``-1`` when the parent is the root.
        parent_rows: ``LongTensor [m]`` row of each node's parent within the
            *previous* frontier (the previous batched forward), ``-1`` when the
            parent is the root.  EAGLE-style drafters feed the parent's output
            hidden state together with the child token; index the previous
            forward's hidden states with this (root: last prefix position).
        pool_mask: ``BoolTensor [m, P]``; ``pool_mask[i, j]`` True iff pool
            node ``j`` is an ancestor-or-self of frontier node ``i``.
        draft_mask: ``BoolTensor [m, F]``; the same relation restricted to
            draft slots (``draft_mask = pool_mask[:, draft_pool_indices]``).
            The last ``m`` columns are this frontier itself (diagonal True).
        draft_pool_indices: ``LongTensor [F]`` pool index of each draft slot,
            in the order the nodes were fed to the drafter; the last ``m``
            entries equal ``pool_indices``.

    How to build the draft-side attention mask: the draft KV cache holds the
    prefix (root included; it is visible to every node) followed by the
    previous frontiers' entries in draft-slot order.  The query rows are this
    frontier; the key columns are ``[prefix | slots 0..F-1]``, with the last
    ``m`` slots being the queries themselves.  The boolean 4D mask is
    ``cat([ones(m, prefix_len + 1), draft_mask], -1)[None, None]`` (convert to
    additive 0/-inf if the model wants that).  Ancestors are always earlier
    frontier nodes, so no pool node that was never fed to the drafter is ever
    needed as a key.
    """

    tokens: Tensor
    depths: Tensor
    scores: Tensor
    pool_indices: Tensor
    parent_pool_indices: Tensor
    parent_rows: Tensor
    pool_mask: Tensor
    draft_mask: Tensor
    draft_pool_indices: Tensor

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    def position_ids(self, prefix_len: int) -> Tensor:
        """``LongTensor [1, m]`` = ``prefix_len + depth`` (prefix_len = root
        position = number of tokens before the root)."""
        return (self.depths + int(prefix_len)).unsqueeze(0)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class TreeBuilder:
    """Incremental EAGLE-2 dynamic draft-tree construction.

    Args:
        top_k: children proposed per expanded node, and frontier width.
        depth: number of draft levels below the root (the drafter runs
            ``depth - 1`` batched forwards after the root's).
        total_tokens: maximum tree size *including* the root.

    Algorithm: level 1 = top-k tokens of the root distribution (score =
    log-prob).  Each further level: every frontier node proposes its top-k
    tokens (score = parent score + log-prob), all ``m*k`` go into the pool and
    the next frontier is the global top-k of those by score (ties: lower pool
    index).  :meth:`build` keeps the best ``total_tokens - 1`` pool nodes and
    orders them by pool index (creation order), which is topological.

    Per-node top-k uses :func:`torch.topk`; which of several exactly tied
    tokens at the k-th place is chosen is torch's choice (deterministic for a
    given device), and losslessness of verification does not depend on it.

    The pool (every node created so far, in creation order) is readable after
    :meth:`start` as ``pool_tokens``, ``pool_parents`` (pool index, ``-1`` =
    root), ``pool_scores`` (cumulative log-probs) and ``pool_depths``; callers
    read them (cost model, tests) but must not modify them.
    """

    def __init__(self, top_k: int, depth: int, total_tokens: int):
        self.top_k = _check_int("top_k", top_k, 1)
        self.depth = _check_int("depth", depth, 1)
        self.total_tokens = _check_int("total_tokens", total_tokens, 2)
        self._started = False
        self._done = False

    @property
    def done(self) -> bool:
        """True once ``depth`` levels exist (no more draft forwards needed)."""
        return self._done

    # -- incremental interface -------------------------------------------

    def start(self, root_token: int, root_logprobs: Tensor) -> Frontier | None:
        """Begin a tree at ``root_token`` given the draft log-probs ``[V]`` at
        the root.  Creates depth-1 nodes and returns them as a
        :class:`Frontier`, or ``None`` when ``depth == 1`` (nothing left to
        draft).  May be called again to reset the builder."""
        if root_logprobs.dim() == 2 and root_logprobs.shape[0] == 1:
            root_logprobs = root_logprobs[0]
        if root_logprobs.dim() != 1:
            raise ValueError(f"root_logprobs must have shape [V], got {tuple(root_logprobs.shape)}")
        lp = root_logprobs.detach().float()
        self.device = lp.device
        self.vocab_size = lp.shape[0]
        if self.vocab_size < 1:
            raise ValueError("root_logprobs has an empty vocabulary")
        self.root_token = int(root_token)
        k = min(self.top_k, self.vocab_size)
        vals, idx = torch.topk(lp, k)

        self.pool_tokens = idx
        self.pool_parents = torch.full((k,), -1, dtype=torch.long, device=self.device)
        self.pool_scores = vals
        self.pool_depths = torch.ones(k, dtype=torch.long, device=self.device)
        self._level = 1
        self._started = True
        self._done = False
        # Frontier state.
        self._frontier = torch.arange(k, device=self.device)
        self._frontier_rows_of_parent = torch.full((k,), -1, dtype=torch.long, device=self.device)
        # Ancestor-or-self rows of the frontier over the pool [m, P].
        self._frontier_anc = torch.eye(k, dtype=torch.bool, device=self.device)
        self._draft_slots = self._frontier.clone()
        if self.depth == 1:
            self._done = True
            return None
        return self._make_frontier()

    def expand(self, frontier_logprobs: Tensor) -> Frontier | None:
        """Add the children of the current frontier.

        ``frontier_logprobs``: ``[m, V]`` draft log-probs at each frontier node
        (row ``i`` = the distribution of the token following frontier node
        ``i``).  Returns the next frontier, or ``None`` once ``depth`` levels
        exist (then call :meth:`build`).
        """
        if not self._started:
            raise RuntimeError("call start() before expand()")
        if self._done:
            raise RuntimeError(f"tree already has depth {self.depth}; call build()")
        m = self._frontier.numel()
        if frontier_logprobs.dim() != 2 or tuple(frontier_logprobs.shape) != (m, self.vocab_size):
            raise ValueError(
                f"frontier_logprobs must have shape [{m}, {self.vocab_size}] "
                f"(frontier size, vocab), got {tuple(frontier_logprobs.shape)}"
            )
        lp = frontier_logprobs.detach().float().to(self.device)
        k = min(self.top_k, self.vocab_size)
        vals, idx = torch.topk(lp, k, dim=-1)  # [m, k] each
        parent_scores = self.pool_scores[self._frontier]
        cum = (parent_scores[:, None] + vals).reshape(-1)  # [m*k]
        new_tokens = idx.reshape(-1)
        new_parents = self._frontier.repeat_interleave(k)
        n_new = m * k
        P_old = self.pool_tokens.numel()
        P_new = P_old + n_new

        self.pool_tokens = torch.cat([self.pool_tokens, new_tokens])
        self.pool_parents = torch.cat([self.pool_parents, new_parents])
        self.pool_scores = torch.cat([self.pool_scores, cum])
        self._level += 1
        self.pool_depths = torch.cat(
            [self.pool_depths, torch.full((n_new,), self._level, dtype=torch.long, device=self.device)]
        )

        # Next frontier: global top-k by score, ties -> lower pool index
        # (stable sort keeps creation order among equal scores).
        order = torch.sort(cum, descending=True, stable=True).indices
        sel = order[: min(self.top_k, n_new)]
        # Ancestor rows of the selected children: parent's row (padded to the
        # new pool size) plus their own bit.
        parent_row = torch.div(sel, k, rounding_mode="floor")
        anc = torch.zeros(sel.numel(), P_new, dtype=torch.bool, device=self.device)
        anc[:, :P_old] = self._frontier_anc[parent_row]
        new_pool_idx = P_old + sel
        anc[torch.arange(sel.numel(), device=self.device), new_pool_idx] = True

        self._frontier = new_pool_idx
        self._frontier_rows_of_parent = parent_row
        self._frontier_anc = anc
        if self._level >= self.depth:
            self._done = True
            return None
        self._draft_slots = torch.cat([self._draft_slots, new_pool_idx])
        return self._make_frontier()

    def _make_frontier(self) -> Frontier:
        f = self._frontier
        return Frontier(
            tokens=self.pool_tokens[f],
            depths=self.pool_depths[f],
            scores=self.pool_scores[f],
            pool_indices=f,
            parent_pool_indices=self.pool_parents[f],
            parent_rows=self._frontier_rows_of_parent,
            pool_mask=self._frontier_anc,
            draft_mask=self._frontier_anc[:, self._draft_slots],
            draft_pool_indices=self._draft_slots,
        )

    def build(self) -> DraftTree:
        """Re-rank the pool and return the final :class:`DraftTree`.

        Keeps the top ``total_tokens - 1`` pool nodes by cumulative score and
        sorts them by pool index.  May be called before ``depth`` is reached
        (it uses whatever the pool holds).
        """
        if not self._started:
            raise RuntimeError("call start() before build()")
        P = self.pool_tokens.numel()
        n_keep = min(self.total_tokens - 1, P)
        scores = self.pool_scores
        parents = self.pool_parents
        # Ranking key = running min of the score along the ancestor chain.
        # With genuine log-probs (<= 0) this *is* the score; it only matters
        # for pseudo log-probs > 0, where it still guarantees closure.  Pool
        # order is topological, so one pass in index order suffices; done
        # level by level to keep it vectorised.
        key = scores.clone()
        depths = self.pool_depths
        for d in range(2, self._level + 1):
            idx = (depths == d).nonzero(as_tuple=True)[0]
            key[idx] = torch.minimum(key[idx], key[parents[idx]])
        # Stable descending sort: among equal keys the lower pool index wins,
        # and a parent has a lower index and a key >= its child's, so the kept
        # set is closed under "parent".
        order = torch.sort(key, descending=True, stable=True).indices
        keep = torch.sort(order[:n_keep]).values

        remap = torch.full((P,), -1, dtype=torch.long, device=self.device)
        remap[keep] = torch.arange(1, n_keep + 1, device=self.device)
        kept_parents = parents[keep]
        node_parents = torch.where(
            kept_parents < 0,
            torch.zeros_like(kept_parents),
            remap[kept_parents.clamp(min=0)],
        )
        if bool((node_parents < 0).any()):  # pragma: no cover - guarded by construction
            raise AssertionError("internal error: kept set is not closed under parent")
        tokens = torch.cat([torch.tensor([self.root_token], device=self.device), self.pool_tokens[keep]])
        all_parents = torch.cat([torch.tensor([-1], device=self.device), node_parents])
        all_scores = torch.cat([torch.zeros(1, device=self.device), scores[keep]])
        return DraftTree.from_parents(tokens, all_parents, all_scores)


def build_tree_from_fn(
    root_token: int,
    draft_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    top_k: int,
    depth: int,
    total_tokens: int,
) -> DraftTree:
    """Drive a :class:`TreeBuilder` with a stub drafter (used by tests).

    ``draft_fn(tokens, parents_mask, depths) -> logprobs`` is called once per
    level, like a KV-cached drafter would be:

    * ``tokens``: ``LongTensor [F + 1]`` every token fed to the drafter so
      far, root first (slot 0), then the draft slots; the last ``m`` entries
      are the current queries.
    * ``parents_mask``: ``BoolTensor [m, F + 1]``; row ``i`` marks the
      ancestors-or-self (root included) of query ``i`` among ``tokens``.
      ``tokens[parents_mask[i]]`` is query ``i``'s path root -> itself.
    * ``depths``: ``LongTensor [m]`` depths of the queries (root = 0).

    It must return ``[m, V]`` log-probs.  The first call is for the root
    alone: ``tokens = [root]``, ``parents_mask = [[True]]``, ``depths = [0]``.
    """
    builder = TreeBuilder(top_k, depth, total_tokens)
    root = torch.tensor([int(root_token)], dtype=torch.long)
    root_lp = draft_fn(root, torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    frontier = builder.start(int(root_token), root_lp.reshape(-1))
    while frontier is not None:
        slot_tokens = builder.pool_tokens[frontier.draft_pool_indices]
        toks = torch.cat([root.to(slot_tokens.device), slot_tokens])
        m = frontier.size
        pmask = torch.cat(
            [torch.ones(m, 1, dtype=torch.bool, device=frontier.draft_mask.device), frontier.draft_mask], dim=1
        )
        lp = draft_fn(toks, pmask, frontier.depths)
        frontier = builder.expand(lp)
    return builder.build()
