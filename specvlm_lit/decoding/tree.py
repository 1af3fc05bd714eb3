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
    "BatchedTreeBuilder",
    "DraftTree",
    "Frontier",
    "TreeBuilder",
    "ancestor_mask",
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
        scores:  ``FloatTensor [n]`` cumulative draft log-prob (root 0).

    :attr:`paths` (one row per leaf) is derived on demand: decoding never needs it.

    :meth:`BatchedTreeBuilder.build` returns the same fields with a leading batch dimension (``tokens [B, n]``,
    ``mask [B, n, n]``, ...): one tree per row, every row of the same size. The queries below are for a single tree.
    """

    tokens: Tensor
    parents: Tensor
    depths: Tensor
    mask: Tensor
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

        if scores is None:
            sc = torch.zeros(n, dtype=torch.float32)
        else:
            sc = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
            if sc.numel() != n:
                raise ValueError(f"tokens has {n} entries but scores has {sc.numel()}")
        return cls(tok, par, depths, mask, sc).to(device)

    def to(self, device: str | torch.device) -> DraftTree:
        """Return a copy with every tensor moved to ``device``."""
        return DraftTree(
            tokens=self.tokens.to(device),
            parents=self.parents.to(device),
            depths=self.depths.to(device),
            mask=self.mask.to(device),
            scores=self.scores.to(device),
        )

    # -- queries ----------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of nodes, root included."""
        return int(self.tokens.numel())

    @property
    def paths(self) -> Tensor:
        """``LongTensor [num_leaves, max_depth + 1]``; one row per leaf (leaves in node order), listing node indices
        root -> leaf, right-padded with ``-1``.  Column ``d`` holds the depth-``d`` node."""
        n = self.size
        is_parent = torch.zeros(n, dtype=torch.bool, device=self.tokens.device)
        is_parent[self.parents[1:]] = True
        leaves = (~is_parent).nonzero(as_tuple=True)[0]
        # Each leaf's path is the set of its ancestors-or-self; node j goes to column depths[j] (root -> leaf order).
        paths = torch.full((leaves.numel(), self.max_depth + 1), -1, dtype=torch.long, device=self.tokens.device)
        rows, cols = self.mask[leaves].nonzero(as_tuple=True)
        paths[rows, self.depths[cols]] = cols
        return paths

    @property
    def num_leaves(self) -> int:
        return int(self.paths.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

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
    level: int = 1  # the frontier's depth (every node of it sits at this depth)

    @property
    def size(self) -> int:
        """``m``, the frontier's width (per row for a :class:`BatchedTreeBuilder`'s frontier)."""
        return int(self.tokens.shape[-1])

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


def ancestor_mask(parents: Tensor, levels: int) -> Tensor:
    """Ancestor-or-self masks ``BoolTensor [B, n, n]`` of trees given as ``parents [B, n]`` (``-1`` at the root, node 0)
    whose deepest node is at most ``levels`` below the root.

    Vectorised transitive closure: ``M = I + A`` (``A[i, parent(i)] = 1``) covers paths of length <= 1, and each
    squaring doubles that, so ``ceil(log2(levels))`` batched matmuls give every ancestor (0/1 values summed in
    float32 are exact for any tree size that fits in memory).
    """
    b, n = parents.shape
    m = torch.eye(n, device=parents.device).expand(b, n, n).clone()
    if n > 1:
        m[:, 1:, :].scatter_(2, parents[:, 1:, None].clamp(min=0), 1.0)
    for _ in range(max(0, int(levels) - 1).bit_length()):
        m = torch.bmm(m, m).clamp_(max=1.0)
    return m.bool()


class BatchedTreeBuilder:
    """Incremental EAGLE-2 dynamic draft-tree construction for ``B`` trees at once (one per batch row).

    Args:
        top_k: children proposed per expanded node, and frontier width.
        depth: number of draft levels below the root (the drafter runs
            ``depth - 1`` batched forwards after the root's).
        total_tokens: maximum tree size *including* the root.

    Algorithm (per row): level 1 = top-k tokens of the root distribution (score =
    log-prob).  Each further level: every frontier node proposes its top-k
    tokens (score = parent score + log-prob), all ``m*k`` go into the pool and
    the next frontier is the global top-k of those by score (ties: lower pool
    index).  :meth:`build` keeps the best ``total_tokens - 1`` pool nodes and
    orders them by pool index (creation order), which is topological.

    Every row has the same pool layout (level ``d`` occupies the same pool
    columns in every row, so ``pool_depths`` is shared) and the same tree size;
    only tokens, scores and parents differ.  All of it is batched tensor code on
    the log-probs' device with no host synchronisation, so a batch of trees
    costs the same number of ops as one.

    Per-node top-k uses :func:`torch.topk`; which of several exactly tied
    tokens at the k-th place is chosen is torch's choice (deterministic for a
    given device), and losslessness of verification does not depend on it.

    The pool (every node created so far, in creation order) is readable after
    :meth:`start` as ``pool_tokens``, ``pool_parents`` (pool index, ``-1`` =
    root), ``pool_scores`` (cumulative log-probs), all ``[B, P]``, and
    ``pool_depths`` ``[P]``; callers read them (cost model, tests) but must not
    modify them.
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

    def _start(self, root_tokens: Tensor, root_logprobs: Tensor) -> Frontier | None:
        lp = root_logprobs.detach().float()
        self.device = lp.device
        self.batch_size, self.vocab_size = lp.shape
        if self.vocab_size < 1:
            raise ValueError("root_logprobs has an empty vocabulary")
        self.root_tokens = torch.as_tensor(root_tokens, dtype=torch.long).to(self.device).reshape(self.batch_size)
        b, k = self.batch_size, min(self.top_k, self.vocab_size)
        vals, idx = torch.topk(lp, k, dim=-1)
        self._pool_tokens = idx
        self._pool_parents = torch.full((b, k), -1, dtype=torch.long, device=self.device)
        self._pool_scores = vals
        self.pool_depths = torch.ones(k, dtype=torch.long, device=self.device)
        self._level_starts = [0, k]  # pool columns of level d: [starts[d - 1], starts[d])
        self._level = 1
        self._started = True
        self._done = False
        # Frontier state.
        self._frontier = torch.arange(k, device=self.device).expand(b, k)
        self._frontier_rows_of_parent = torch.full((b, k), -1, dtype=torch.long, device=self.device)
        # Ancestor-or-self rows of the frontier over the pool [B, m, P].
        self._frontier_anc = torch.eye(k, dtype=torch.bool, device=self.device).expand(b, k, k)
        self._draft_slots = self._frontier
        if self.depth == 1:
            self._done = True
            return None
        return self._make_frontier()

    def start(self, root_tokens: Tensor | Sequence[int], root_logprobs: Tensor) -> Frontier | None:
        """Begin ``B`` trees at ``root_tokens [B]`` given the draft log-probs ``[B, V]`` at the roots.  Creates the
        depth-1 nodes and returns them as a :class:`Frontier` with a leading batch dimension (``tokens [B, m]``,
        ``draft_mask [B, m, F]``, ...), or ``None`` when ``depth == 1``.  May be called again to reset."""
        if root_logprobs.dim() != 2:
            raise ValueError(f"root_logprobs must have shape [B, V], got {tuple(root_logprobs.shape)}")
        return self._start(root_tokens, root_logprobs)

    def expand(self, frontier_logprobs: Tensor) -> Frontier | None:
        """Add the children of the current frontier.

        ``frontier_logprobs``: ``[B, m, V]`` draft log-probs at each frontier
        node (row ``i`` = the distribution of the token following frontier node
        ``i``).  Returns the next frontier, or ``None`` once ``depth`` levels
        exist (then call :meth:`build`).
        """
        self._check_expandable()
        b, m = self._frontier.shape
        if tuple(frontier_logprobs.shape) != (b, m, self.vocab_size):
            raise ValueError(
                f"frontier_logprobs must have shape [{b}, {m}, {self.vocab_size}] "
                f"(batch, frontier size, vocab), got {tuple(frontier_logprobs.shape)}"
            )
        return self._expand(frontier_logprobs)

    def _check_expandable(self) -> None:
        """The state guard of :meth:`expand`, shared with :class:`TreeBuilder` (which checks another shape)."""
        if not self._started:
            raise RuntimeError("call start() before expand()")
        if self._done:
            raise RuntimeError(f"tree already has depth {self.depth}; call build()")

    def _expand(self, frontier_logprobs: Tensor) -> Frontier | None:
        lp = frontier_logprobs.detach().float().to(self.device)
        b, m = self._frontier.shape
        k = min(self.top_k, self.vocab_size)
        vals, idx = torch.topk(lp, k, dim=-1)  # [B, m, k] each
        parent_scores = self._pool_scores.gather(1, self._frontier)
        cum = (parent_scores[..., None] + vals).reshape(b, m * k)
        n_new = m * k
        p_old = self._pool_tokens.shape[1]
        p_new = p_old + n_new

        self._pool_tokens = torch.cat([self._pool_tokens, idx.reshape(b, n_new)], 1)
        self._pool_parents = torch.cat([self._pool_parents, self._frontier.repeat_interleave(k, dim=1)], 1)
        self._pool_scores = torch.cat([self._pool_scores, cum], 1)
        self._level += 1
        self.pool_depths = torch.cat(
            [self.pool_depths, torch.full((n_new,), self._level, dtype=torch.long, device=self.device)]
        )
        self._level_starts.append(p_new)

        # Next frontier: global top-k by score, ties -> lower pool index
        # (stable sort keeps creation order among equal scores).
        sel = torch.sort(cum, dim=1, descending=True, stable=True).indices[:, : min(self.top_k, n_new)]
        # Ancestor rows of the selected children: parent's row (padded to the
        # new pool size) plus their own bit.
        parent_row = torch.div(sel, k, rounding_mode="floor")
        anc = torch.zeros(b, sel.shape[1], p_new, dtype=torch.bool, device=self.device)
        anc[:, :, :p_old] = self._frontier_anc.gather(1, parent_row[..., None].expand(-1, -1, p_old))
        new_pool_idx = p_old + sel
        anc.scatter_(2, new_pool_idx[..., None], True)

        self._frontier = new_pool_idx
        self._frontier_rows_of_parent = parent_row
        self._frontier_anc = anc
        if self._level >= self.depth:
            self._done = True
            return None
        self._draft_slots = torch.cat([self._draft_slots, new_pool_idx], 1)
        return self._make_frontier()

    def _make_frontier(self) -> Frontier:
        f = self._frontier
        m = f.shape[1]
        return Frontier(
            tokens=self._pool_tokens.gather(1, f),
            depths=self.pool_depths[f],
            scores=self._pool_scores.gather(1, f),
            pool_indices=f,
            parent_pool_indices=self._pool_parents.gather(1, f),
            parent_rows=self._frontier_rows_of_parent,
            pool_mask=self._frontier_anc,
            draft_mask=self._frontier_anc.gather(2, self._draft_slots[:, None, :].expand(-1, m, -1)),
            draft_pool_indices=self._draft_slots,
            level=self._level,
        )

    @property
    def pool_tokens(self) -> Tensor:
        return self._pool_tokens

    @property
    def pool_parents(self) -> Tensor:
        return self._pool_parents

    @property
    def pool_scores(self) -> Tensor:
        return self._pool_scores

    @property
    def level(self) -> int:
        """Levels drafted so far (the deepest node's depth)."""
        return self._level

    def build(self) -> DraftTree:
        """Re-rank the pool and return the ``B`` trees as one :class:`DraftTree` with a leading batch dimension.

        Keeps the top ``total_tokens - 1`` pool nodes of each row by cumulative
        score and sorts them by pool index.  May be called before ``depth`` is
        reached (it uses whatever the pool holds).
        """
        if not self._started:
            raise RuntimeError("call start() before build()")
        b, p = self._pool_tokens.shape
        n_keep = min(self.total_tokens - 1, p)
        scores, parents = self._pool_scores, self._pool_parents
        # Ranking key = running min of the score along the ancestor chain.
        # With genuine log-probs (<= 0) this *is* the score; it only matters
        # for pseudo log-probs > 0, where it still guarantees closure.  Pool
        # order is topological, so one pass level by level suffices.
        key = scores.clone()
        for d in range(2, self._level + 1):
            lo, hi = self._level_starts[d - 1], self._level_starts[d]
            key[:, lo:hi] = torch.minimum(key[:, lo:hi], key.gather(1, parents[:, lo:hi]))
        # Stable descending sort: among equal keys the lower pool index wins,
        # and a parent has a lower index and a key >= its child's, so the kept
        # set is closed under "parent" (tests/test_tree.py checks it).
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        keep = torch.sort(order[:, :n_keep], dim=1).values

        remap = torch.full((b, p), -1, dtype=torch.long, device=self.device)
        remap.scatter_(1, keep, torch.arange(1, n_keep + 1, device=self.device).expand(b, n_keep))
        kept_parents = parents.gather(1, keep)
        node_parents = torch.where(
            kept_parents < 0, torch.zeros_like(kept_parents), remap.gather(1, kept_parents.clamp(min=0))
        )
        col = lambda value, dtype: torch.full((b, 1), value, dtype=dtype, device=self.device)  # noqa: E731
        all_parents = torch.cat([col(-1, torch.long), node_parents], 1)
        return DraftTree(
            tokens=torch.cat([self.root_tokens[:, None], self._pool_tokens.gather(1, keep)], 1),
            parents=all_parents,
            depths=torch.cat([col(0, torch.long), self.pool_depths[keep]], 1),
            mask=ancestor_mask(all_parents, self._level),
            scores=torch.cat([col(0.0, torch.float32), scores.gather(1, keep)], 1),
        )


class TreeBuilder(BatchedTreeBuilder):
    """:class:`BatchedTreeBuilder` for one tree (batch size 1) with unbatched tensors: ``start(root_token,
    root_logprobs [V])``, frontiers with ``tokens [m]``, ``draft_mask [m, F]``, ..., ``expand(logprobs [m, V])``,
    ``pool_*`` of shape ``[P]`` and :meth:`build` returning a plain :class:`DraftTree`.
    """

    def start(self, root_token: int, root_logprobs: Tensor) -> Frontier | None:
        """Begin a tree at ``root_token`` given the draft log-probs ``[V]`` at
        the root.  Creates depth-1 nodes and returns them as a
        :class:`Frontier`, or ``None`` when ``depth == 1`` (nothing left to
        draft).  May be called again to reset the builder."""
        if root_logprobs.dim() == 2 and root_logprobs.shape[0] == 1:
            root_logprobs = root_logprobs[0]
        if root_logprobs.dim() != 1:
            raise ValueError(f"root_logprobs must have shape [V], got {tuple(root_logprobs.shape)}")
        self.root_token = int(root_token)
        return self._squeeze(self._start(torch.tensor([self.root_token]), root_logprobs[None]))

    def expand(self, frontier_logprobs: Tensor) -> Frontier | None:
        """:meth:`BatchedTreeBuilder.expand` for one tree: ``frontier_logprobs [m, V]``, an unbatched frontier."""
        self._check_expandable()
        m = self._frontier.shape[1]
        if frontier_logprobs.dim() != 2 or tuple(frontier_logprobs.shape) != (m, self.vocab_size):
            raise ValueError(
                f"frontier_logprobs must have shape [{m}, {self.vocab_size}] "
                f"(frontier size, vocab), got {tuple(frontier_logprobs.shape)}"
            )
        return self._squeeze(self._expand(frontier_logprobs[None]))

    @staticmethod
    def _squeeze(f: Frontier | None) -> Frontier | None:
        if f is None:
            return None
        return Frontier(
            tokens=f.tokens[0],
            depths=f.depths[0],
            scores=f.scores[0],
            pool_indices=f.pool_indices[0],
            parent_pool_indices=f.parent_pool_indices[0],
            parent_rows=f.parent_rows[0],
            pool_mask=f.pool_mask[0],
            draft_mask=f.draft_mask[0],
            draft_pool_indices=f.draft_pool_indices[0],
            level=f.level,
        )

    @property
    def pool_tokens(self) -> Tensor:
        return self._pool_tokens[0]

    @property
    def pool_parents(self) -> Tensor:
        return self._pool_parents[0]

    @property
    def pool_scores(self) -> Tensor:
        return self._pool_scores[0]

    def build(self) -> DraftTree:
        """Re-rank the pool and return the final :class:`DraftTree`.

        Keeps the top ``total_tokens - 1`` pool nodes by cumulative score and
        sorts them by pool index.  May be called before ``depth`` is reached
        (it uses whatever the pool holds).
        """
        t = super().build()
        return DraftTree(t.tokens[0], t.parents[0], t.depths[0], t.mask[0], t.scores[0])


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
