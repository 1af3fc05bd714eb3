"""Lossless acceptance of a verified draft tree.

The target model scores every node of a :class:`~specvlm_lit.decoding.tree.DraftTree`
in one forward; ``target_logits[i]`` is the target's next-token logits *after*
node ``i`` (i.e. conditioned on the prefix plus the root->i path).  This
module turns those logits into the tokens to emit:

* :func:`accept_greedy` (temperature 0) reproduces plain greedy decoding
  token for token: a node is accepted iff its token is the target's argmax at
  its parent, the deepest fully accepted node wins and the target's argmax
  there is the bonus token.
* :func:`accept_sampling` (temperature > 0) is multi-candidate speculative
  sampling with a *deterministic* draft (top-k proposals, so the draft
  probability of each proposal is 1).  At the current node we walk its
  distinct children in node order; child ``x`` is accepted with probability
  ``p(x)`` under the current residual ``p``; on rejection ``p(x) <- 0`` and
  ``p`` is renormalised.  If nothing is accepted we sample the bonus token
  from the residual.  Why this is exact: for the first child,
  P(emit x1) = p(x1); otherwise the residual is p restricted to tokens != x1,
  renormalised, i.e. exactly the conditional law of the target sample given
  "it is not x1"; by induction over the children, the emitted token is
  distributed as p, and conditioned on it being a child we continue from that
  child with its own (target) distribution - the same as autoregressive
  sampling.

The target logits are warped first with :func:`warp_logits`, which mirrors
Hugging Face ``generate()`` (temperature, then top-k, then top-p) so
speculative output has the same distribution as ``generate(do_sample=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .configs import WarpConfig
from .tree import DraftTree

__all__ = [
    "Acceptance",
    "WarpConfig",
    "warp_scores",
    "warp_logits",
    "accept_greedy",
    "accept_sampling",
    "greedy_paths",
    "accept_sampling_probs",
    "truncate_at_eos",
]


# ---------------------------------------------------------------------------
# Warping
# ---------------------------------------------------------------------------


def warp_scores(logits: Tensor, cfg: WarpConfig) -> Tensor:
    """Warped *logits* ``[..., V]`` (float32), filtered entries set to ``-inf``.

    This is exactly HF ``generate()``'s sampling warper chain with
    ``min_tokens_to_keep = 1`` (non-beam sampling):

    * ``TemperatureLogitsWarper`` - added only when ``temperature != 1``;
    * ``TopKLogitsWarper`` - only when ``top_k != 0``: drop every logit
      strictly below the k-th largest (so ties at the boundary are all kept);
    * ``TopPLogitsWarper`` - only when ``top_p < 1``: sort ascending, drop the
      tokens whose ascending cumulative probability is ``<= 1 - top_p``, but
      always keep the largest one.

    The same torch ops are used in the same order (including the float32
    cast HF applies to the last-position logits) so results match bit for bit.
    For greedy configs the logits are returned unwarped (HF applies no warper
    when ``do_sample=False``).
    """
    scores = logits.float()
    if cfg.greedy:
        return scores
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k != 0:
        k = min(max(cfg.top_k, 1), scores.size(-1))
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if cfg.top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative_probs <= (1 - cfg.top_p)
        sorted_remove[..., -1:] = 0  # min_tokens_to_keep = 1
        remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


def warp_logits(logits: Tensor, cfg: WarpConfig) -> Tensor:
    """Target next-token **probabilities** ``[..., V]`` (float32) under ``cfg``.

    Sampling configs: ``softmax(warp_scores(logits, cfg))``, the exact
    distribution HF ``generate()`` samples from.  Greedy configs: the one-hot
    of ``argmax`` (first index among ties, like ``torch.argmax`` used by HF
    greedy search), i.e. the degenerate distribution greedy decoding follows.
    We return probabilities rather than log-probs because the acceptance rule
    compares and zeroes probabilities directly.
    """
    if cfg.greedy:
        idx = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(-1, idx, 1.0)
    return torch.softmax(warp_scores(logits, cfg), dim=-1)


# ---------------------------------------------------------------------------
# Acceptance
# ---------------------------------------------------------------------------


@dataclass
class Acceptance:
    """Result of verifying a draft tree.

    Attributes (on the host: the accept decision is where a decoding round
    synchronises, once, and everything after it reads these without waiting
    on the device):
        accepted: ``LongTensor [a + 1]`` (CPU) tree node indices root first
            (root, then the ``a`` accepted draft nodes along one path).  The
            caller keeps these nodes' target KV entries and drops the rest.
        tokens: ``LongTensor [a + 1]`` (CPU) new tokens to emit: the accepted
            draft tokens followed by the bonus token sampled/argmaxed at the
            last accepted node.  (The root is not re-emitted.)
        num_accepted_drafts: ``a``.
    """

    accepted: Tensor
    tokens: Tensor
    num_accepted_drafts: int

    @property
    def last_node(self) -> int:
        """Tree index of the deepest accepted node (whose logits gave the bonus)."""
        return int(self.accepted[-1])

    @property
    def bonus_token(self) -> int:
        return int(self.tokens[-1])


def _check_logits(tree: DraftTree, target_logits: Tensor) -> Tensor:
    if target_logits.dim() == 3 and target_logits.shape[0] == 1:
        target_logits = target_logits[0]
    if target_logits.dim() != 2 or target_logits.shape[0] != tree.size:
        raise ValueError(
            f"target_logits must have shape [n, V] with n = tree.size = {tree.size}, got {tuple(target_logits.shape)}"
        )
    return target_logits


def accept_greedy(tree: DraftTree, target_logits: Tensor) -> Acceptance:
    """Greedy (T = 0) verification; output equals plain greedy decoding.

    Node ``i > 0`` matches iff ``tokens[i] == argmax(target_logits[parent(i)])``;
    a node is accepted iff it and all its ancestors match.  The deepest
    accepted node wins (ties: lowest node index; with distinct siblings the
    accepted nodes form a single chain, so ties cannot occur there), and the
    target argmax at it is the bonus token.
    """
    target_logits = _check_logits(tree, target_logits)
    path, bonus = greedy_paths(
        tree.tokens[None], tree.parents[None], tree.depths[None], tree.mask[None], target_logits[None]
    )
    n = tree.size
    # The one host transfer: which nodes are on the accepted path, their tokens, the bonus token.
    host = torch.cat([path[0].long(), tree.tokens.to(path.device), bonus]).tolist()
    accepted = [i for i in range(n) if host[i]]  # ascending == root -> best
    tokens = [host[n + i] for i in accepted[1:]] + [host[2 * n]]
    return Acceptance(
        accepted=torch.tensor(accepted, dtype=torch.long),
        tokens=torch.tensor(tokens, dtype=torch.long),
        num_accepted_drafts=len(accepted) - 1,
    )


def greedy_paths(
    tokens: Tensor, parents: Tensor, depths: Tensor, mask: Tensor, target_logits: Tensor
) -> tuple[Tensor, Tensor]:
    """Greedy verification of ``B`` trees at once, on their device and without host synchronisation.

    Takes batched tree tensors (``tokens`` / ``parents`` / ``depths`` ``[B, n]``, ``mask [B, n, n]``, as
    :meth:`~.tree.BatchedTreeBuilder.build` returns them) and ``target_logits [B, n, V]``. Returns ``(path [B, n]
    bool, bonus [B])``: the nodes of each row's accepted root-to-node path (the rule of :func:`accept_greedy`) and
    the target's argmax at its deepest node.
    """
    pred = target_logits.argmax(dim=-1).to(tokens.device)  # first max on ties, like HF
    ok = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    ok[:, 1:] = tokens[:, 1:] == pred.gather(1, parents[:, 1:].clamp(min=0))
    # accepted[b, i] <=> every ancestor-or-self of i matches.
    acc = ~(mask & ~ok[:, None, :]).any(dim=2)
    depth_acc = torch.where(acc, depths, torch.full_like(depths, -1))
    best = torch.argmax(depth_acc, dim=1, keepdim=True)  # first index of the max depth
    path = mask.gather(1, best[..., None].expand(-1, 1, mask.shape[2]))[:, 0]
    return path, pred.gather(1, best)[:, 0]


def accept_sampling(
    tree: DraftTree,
    target_logits: Tensor,
    cfg: WarpConfig,
    generator: torch.Generator | None = None,
) -> Acceptance:
    """Sampling (T > 0) verification; emitted tokens are distributed exactly as
    autoregressive sampling from the warped target.

    ``target_logits`` ``[n, V]`` are raw target logits; they are warped with
    :func:`warp_logits` here.  A greedy ``cfg`` delegates to
    :func:`accept_greedy` (consumes no randomness).  ``generator`` drives all
    randomness (``None`` = torch's default RNG).
    """
    if cfg.greedy:
        return accept_greedy(tree, target_logits)
    target_logits = _check_logits(tree, target_logits)
    return accept_sampling_probs(tree, warp_logits(target_logits, cfg), generator)


def accept_sampling_probs(tree: DraftTree, probs: Tensor, generator: torch.Generator | None = None) -> Acceptance:
    """:func:`accept_sampling` on already-warped target probabilities ``[n, V]``
    (rows need not be normalised: non-negative with a positive sum).

    Cost: a handful of small tensor ops per call (and per visited level), all
    data-dependent control flow in Python on scalars - trees are small and
    the walk is inherently sequential.
    """
    probs = _check_logits(tree, probs)
    n = tree.size
    gen_dev = generator.device if generator is not None else probs.device
    parents = tree.parents.tolist()
    tokens = tree.tokens.tolist()
    children = [[] for _ in range(n)]
    for i in range(1, n):
        children[parents[i]].append(i)
    pdev = probs.device
    # p(token_i | parent_i) for every non-root node in one gather.
    tp = tree.parents.to(pdev)
    tt = tree.tokens.to(pdev)
    child_p = [0.0] + probs[tp[1:], tt[1:]].double().tolist()
    # Each child node is tried at most once per call, so one i.i.d. uniform
    # per node suffices; drawing unused ones does not bias anything.
    uniforms = torch.rand(n, generator=generator, device=gen_dev, dtype=torch.float64).tolist()

    cur = 0
    accepted = [0]
    out = []
    while True:
        kids = children[cur]
        next_node = -1
        rejected: list = []
        if kids:
            # Residual mass of the (unnormalised) current distribution.
            mass = float(probs[cur].sum(dtype=torch.float64))
            for c in kids:
                x, px = tokens[c], child_p[c]
                if px <= 0.0 or x in rejected:
                    continue  # zero residual probability: rejected for sure
                if uniforms[c] * mass < px:  # accept with prob px / mass
                    next_node = c
                    break
                rejected.append(x)
                mass -= px
        if next_node >= 0:
            accepted.append(next_node)
            out.append(tokens[next_node])
            cur = next_node
            continue
        # Bonus token from the residual p (rejected children zeroed).
        row = probs[cur].to(device=gen_dev, dtype=torch.float64)
        if rejected:
            row = row.clone()
            row[torch.tensor(rejected, device=gen_dev)] = 0.0
            if not float(row.sum()) > 0.0:
                # Only reachable through float round-off when the last
                # rejected child carried *all* remaining mass (its true
                # acceptance probability was 1): emitting it is exact.
                x = rejected[-1]
                c = next(c for c in kids if tokens[c] == x)
                accepted.append(c)
                out.append(x)
                cur = c
                continue
        out.append(int(torch.multinomial(row, 1, generator=generator)))
        break
    return Acceptance(
        accepted=torch.tensor(accepted, dtype=torch.long),
        tokens=torch.tensor(out, dtype=torch.long),
        num_accepted_drafts=len(accepted) - 1,
    )


# ---------------------------------------------------------------------------
# EOS / budget handling
# ---------------------------------------------------------------------------


def truncate_at_eos(
    tokens: Tensor | Iterable[int],
    eos_ids: None | int | Iterable[int] | Tensor,
    budget: int,
) -> tuple[Tensor, bool]:
    """Cut newly emitted ``tokens`` the way ``generate()`` would.

    ``generate()`` appends one token at a time and stops right after the
    first EOS (which is kept) or when ``max_new_tokens`` is reached.  A
    speculative step emits several tokens at once, so we keep the first
    ``budget`` tokens (``budget`` = remaining max_new_tokens), then cut after
    the first EOS among them.  Returns ``(kept_tokens, finished)`` where
    ``finished`` is True if an EOS was kept or the budget is now exhausted.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() != 1:
        t = t.reshape(-1)
    t = t[:budget]
    if eos_ids is not None:
        eos = torch.as_tensor(eos_ids, dtype=torch.long, device=t.device).reshape(-1)
        if eos.numel() > 0 and t.numel() > 0:
            is_eos = (t[:, None] == eos[None, :]).any(dim=1)
            hits = is_eos.nonzero(as_tuple=True)[0]
            if hits.numel() > 0:
                return t[: int(hits[0]) + 1], True
    return t, t.numel() >= budget
