"""Deliberately broken copies of :func:`specvlm_lit.decoding.acceptance.accept_sampling_probs`.

``tests/test_sampling_law.py`` monkeypatches each mutant in place of the product routine and checks that its
joint-distribution tests reject it: a law test that passes a known-wrong sampler has no power against that bug
class. The mutants share ONE copy of the product's tree walk (:func:`mutated_walk`); each differs from it by a
single switch, and ``mutated_walk(bug=None)`` is checked to be token-identical to the product for the same
generator state, so a rejection can only come from the switched-on bug.

"Depth" below is the depth of the node a draft token hangs under: the children of a depth-``d`` node are the
``(d + 1)``-th tokens of the round. "Deep" bugs only fire for the round's 3rd token on (children of nodes at
depth >= 2) - the tokens no test of the first one or two emitted tokens can see.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from specvlm_lit.decoding.acceptance import Acceptance
from specvlm_lit.decoding.tree import DraftTree

# A drafter's next-token distribution at a tree node, for the "bonus from the drafter" mutant (the product never
# sees the drafter's probabilities, so the test harness has to supply them).
DraftRow = Callable[[DraftTree, int], Tensor]

# name -> what is wrong (and which tree shapes can show it: "siblings" needs >= 2 children per node, "deep" needs
# depth >= 3 nodes, "rejections" needs a rejected draft; every shape of the law tests has rejections).
MUTANTS: dict[str, str] = {
    "accept_positive_from_3rd": "deep: from the round's 3rd token on, accept any draft with p(x) > 0",
    "mass_not_subtracted": "siblings: after a rejection the residual is not renormalised (threshold p(x) / 1)",
    "no_renorm_from_depth3": "siblings + deep: as mass_not_subtracted, but only from the round's 3rd token on",
    "bonus_ignores_rejections": "rejections: bonus drawn from the full target row, rejected drafts not zeroed",
    "bonus_ignores_rejections_deep": "deep: as bonus_ignores_rejections, only below depth-2 nodes",
    "bonus_zeroes_last_rejected_only": "siblings: the bonus residual zeroes only the last rejected sibling",
    "residual_unclamped": "rejections: residual p - q with q = 1 at the draft, not clamped at 0 (multinomial raises)",
    "bonus_from_drafter": "rejections: bonus drawn from the drafter's distribution instead of the target residual",
    "bonus_from_parent_row": "off by one: bonus drawn from the parent node's target row",
    "shared_uniform_round": "one uniform for every accept/reject test of the round",
    "shared_uniform_siblings": "siblings: one uniform per level, shared by all siblings",
    "shared_uniform_levels": "one uniform per sibling rank, reused at every level (first children all share one)",
}

_DEEP = 2  # depth of the parent from which "deep" bugs fire (its children are the round's 3rd tokens)


def _uniforms(tree: DraftTree, children: list[list[int]], bug: str | None, generator, device) -> list[float]:
    """The uniform used to test each node (index = node), as the product draws them unless ``bug`` shares them."""
    n = tree.size
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64).tolist()
    if bug == "shared_uniform_round":
        return [u[0]] * n
    if bug == "shared_uniform_siblings":
        # An extra independent draw per parent, so siblings share one value but levels stay independent.
        per_parent = torch.rand(n, generator=generator, device=device, dtype=torch.float64).tolist()
        parents = tree.parents.tolist()
        return [0.0] + [per_parent[parents[i]] for i in range(1, n)]
    if bug == "shared_uniform_levels":
        rank = [0] * n
        for kids in children:
            for r, c in enumerate(kids):
                rank[c] = r
        return [u[rank[i]] for i in range(n)]
    return u


def mutated_walk(
    tree: DraftTree,
    probs: Tensor,
    generator: torch.Generator | None = None,
    *,
    bug: str | None = None,
    draft_row: DraftRow | None = None,
) -> Acceptance:
    """The product's sibling walk (a copy of ``accept_sampling_probs``) with at most one bug switched on."""
    if bug is not None and bug not in MUTANTS:
        raise KeyError(f"unknown mutant {bug!r}; known: {sorted(MUTANTS)}")
    if probs.dim() == 3:
        probs = probs[0]
    n = tree.size
    gen_dev = generator.device if generator is not None else probs.device
    parents = tree.parents.tolist()
    tokens = tree.tokens.tolist()
    depths = tree.depths.tolist()
    children: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        children[parents[i]].append(i)
    child_p = [0.0] + probs[tree.parents[1:], tree.tokens[1:]].double().tolist()
    uniforms = _uniforms(tree, children, bug, generator, gen_dev)

    cur, accepted, out = 0, [0], []
    while True:
        kids = children[cur]
        deep = depths[cur] >= _DEEP
        next_node, rejected = -1, []
        if kids:
            mass = float(probs[cur].sum(dtype=torch.float64))
            for c in kids:
                x, px = tokens[c], child_p[c]
                if px <= 0.0 or x in rejected:
                    continue
                if bug == "accept_positive_from_3rd" and deep:
                    next_node = c
                    break
                if uniforms[c] * mass < px:
                    next_node = c
                    break
                rejected.append(x)
                if not (bug == "mass_not_subtracted" or (bug == "no_renorm_from_depth3" and deep)):
                    mass -= px
        if next_node >= 0:
            accepted.append(next_node)
            out.append(tokens[next_node])
            cur = next_node
            continue
        row = _bonus_row(tree, probs, cur, parents, rejected, deep, bug, draft_row).to(gen_dev)
        # The product's round-off fallback (the last rejected child carried all the mass); the unclamped mutant is
        # left to torch.multinomial, which rejects its negative entries.
        if rejected and bug != "residual_unclamped" and not float(row.sum()) > 0.0:
            x = rejected[-1]
            c = next(c for c in kids if tokens[c] == x)
            accepted.append(c)
            out.append(x)
            cur = c
            continue
        out.append(int(torch.multinomial(row, 1, generator=generator)))
        break
    dev = tree.tokens.device
    return Acceptance(
        accepted=torch.tensor(accepted, dtype=torch.long, device=dev),
        tokens=torch.tensor(out, dtype=torch.long, device=dev),
        num_accepted_drafts=len(accepted) - 1,
    )


def _bonus_row(tree, probs, cur, parents, rejected, deep, bug, draft_row) -> Tensor:
    """The (unnormalised) distribution the bonus token is drawn from at node ``cur``."""
    if bug == "bonus_from_drafter" and rejected:
        if draft_row is None:
            raise ValueError("the bonus_from_drafter mutant needs draft_row (the drafter's distribution per node)")
        return draft_row(tree, cur).double().clone()
    src = parents[cur] if (bug == "bonus_from_parent_row" and cur > 0) else cur
    row = probs[src].double().clone()
    if not rejected:
        return row
    if bug == "bonus_ignores_rejections" or (bug == "bonus_ignores_rejections_deep" and deep):
        return row
    idx = torch.tensor(rejected)
    if bug == "bonus_zeroes_last_rejected_only":
        row[rejected[-1]] = 0.0
    elif bug == "residual_unclamped":
        row[idx] -= 1.0  # max(p - q, 0) without the max, q = 1 at every rejected (deterministic) draft
    else:
        row[idx] = 0.0
    return row


def make_mutant(bug: str | None, draft_row: DraftRow | None = None):
    """A drop-in replacement for ``accept_sampling_probs(tree, probs, generator=None)`` with ``bug`` switched on."""

    def accept(tree: DraftTree, probs: Tensor, generator: torch.Generator | None = None) -> Acceptance:
        return mutated_walk(tree, probs, generator, bug=bug, draft_row=draft_row)

    accept.__name__ = f"accept_sampling_probs_{bug or 'unmutated'}"
    return accept
