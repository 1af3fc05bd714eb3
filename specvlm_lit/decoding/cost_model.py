"""Cost-aware tree sizing: pick each round's draft depth and tree size by expected tokens per second.

EAGLE-2 re-ranks draft nodes by their cumulative draft probability because that value approximates the
probability that the target accepts the node (SPECVLM.md section 5). The accepted nodes of a round form one
root-to-leaf path, so by linearity of expectation

    E[tokens emitted by a round] = 1 (the target's bonus token) + sum over drafted nodes of P(node accepted)
                                 ~ 1 + sum of exp(cumulative draft log-prob) over the nodes in the tree.

A round costs ``fixed + draft + verify(n)``: ``fixed`` (acceptance, KV compaction, extending the draft cache)
and the draft time per level are measured online while decoding; ``verify(n)``, the target's tree forward
over ``n`` nodes, is timed once per decoder at a few sizes and interpolated. With those, :class:`RoundCostModel`
answers the two questions a round asks:

* after each draft level: is one more level expected to pay for itself? (marginal gain per second of the
  next level vs. the best rate already reachable);
* after drafting: how many of the drafted nodes should the target verify? (the ``n`` that maximises
  ``E(n) / cost(n)``).

Neither decision touches acceptance, so decoding stays exactly lossless; only speed depends on the drafter's
calibration. On a GPU, ``verify(n)`` is nearly flat in ``n`` and big trees win; on a small CPU it grows quickly
and the model picks small, shallow trees when the drafter is unsure and deep ones when it is confident.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RunningMean:
    """Exponential moving average; ``value`` is ``None`` until the first observation.

    ``frozen=True`` keeps ``value`` fixed (timings measured elsewhere, or deterministic tests).
    """

    decay: float = 0.8
    value: float | None = None
    frozen: bool = False

    def update(self, x: float) -> None:
        if self.frozen:
            return
        x = float(x)
        self.value = x if self.value is None else self.decay * self.value + (1.0 - self.decay) * x


class AcceptanceCalibration:
    """Online map from a node's conditional draft probability ``q`` to how often such nodes are accepted.

    A drafter trained on soft targets is often under-confident at T = 0 (a draft token with ``q = 0.3`` may be
    the target's argmax most of the time when it is the drafter's own top choice) and can be over-confident
    elsewhere. Every verification tells, for each node whose parent was accepted, whether the node was accepted
    too. Outcomes are binned by ``q`` and by whether the node is its parent's first (most likely) child, since
    at T = 0 the first child takes almost all acceptances whatever its ``q``. Per bin,
    ``rate = (successes + k * q) / (trials + k)``: the raw ``q`` until the bin has data (``k`` pseudo-trials),
    the measured rate once it does.
    """

    def __init__(self, bins: int = 10, prior_trials: float = 4.0):
        if bins < 1 or prior_trials <= 0:
            raise ValueError(f"bins must be >= 1 and prior_trials > 0, got {bins}, {prior_trials}")
        self.bins, self.k = int(bins), float(prior_trials)
        self.trials = torch.zeros(2 * self.bins, dtype=torch.float64)
        self.successes = torch.zeros(2 * self.bins, dtype=torch.float64)

    @staticmethod
    def first_children(parents: Tensor) -> Tensor:
        """Whether each node is its parent's first child. Siblings are contiguous and best-first both in the tree
        builder's pool and in a built tree (children come from one top-k, and re-ranking keeps their order)."""
        parents = parents.detach().cpu()
        first = torch.ones_like(parents, dtype=torch.bool)
        first[1:] = parents[1:] != parents[:-1]
        return first

    def _bin(self, q: Tensor, first: Tensor) -> Tensor:
        b = (q.clamp(0.0, 1.0) * self.bins).long().clamp(max=self.bins - 1)
        return b + self.bins * first.cpu().long()

    def rate(self, q: Tensor, first: Tensor | bool = True) -> Tensor:
        q = q.detach().double().cpu()
        first = torch.as_tensor(first, dtype=torch.bool).expand_as(q)
        b = self._bin(q, first)
        return ((self.successes[b] + self.k * q) / (self.trials[b] + self.k)).clamp(1e-6, 1.0)

    def observe(self, cond_q: Tensor, first: Tensor, parent_accepted: Tensor, accepted: Tensor) -> None:
        """Record the nodes whose parent was accepted (``parent_accepted``) and whether each was (``accepted``)."""
        keep = parent_accepted.cpu()
        q = cond_q.detach().double().cpu()[keep]
        hit = accepted.cpu()[keep].double()
        b = self._bin(q, first.cpu()[keep])
        self.trials.index_add_(0, b, torch.ones_like(hit))
        self.successes.index_add_(0, b, hit)

    def _conditional(self, scores: Tensor, parents: Tensor, start: int = 0) -> Tensor:
        """Calibrated conditional acceptance rates of nodes ``start..`` given their parents (float64, CPU)."""
        scores = scores.detach().double().cpu()
        parents = parents.detach().cpu()[start:]
        parent_scores = torch.where(parents >= 0, scores[parents.clamp(min=0)], torch.zeros_like(scores[start:]))
        return self.rate((scores[start:] - parent_scores).exp(), self.first_children(parents))

    def extend(self, values: Tensor, scores: Tensor, parents: Tensor) -> Tensor:
        """``values`` (calibrated path probabilities of the first ``len(values)`` nodes) extended to all nodes,
        computing only the new ones. For the tree builder's pool, which grows one level at a time (a level never
        splits a run of siblings, so the first new node starts a run)."""
        start = values.numel()
        cond = self._conditional(scores, parents, start).float()
        new_parents = parents.detach().cpu()[start:]
        has_parent = new_parents >= 0
        if start == 0:
            if bool(has_parent.any()):
                raise ValueError("extend() from no values needs the root's children first")
            return cond
        values = values.float()
        return torch.cat(
            [values, cond * torch.where(has_parent, values[new_parents.clamp(min=0)], torch.ones_like(cond))]
        )

    def path_probs(self, scores: Tensor, parents: Tensor) -> Tensor:
        """Calibrated acceptance probability of every node (a product of calibrated conditionals along its path).

        ``scores``: cumulative draft log-probs; ``parents``: parent index (``-1`` = child of the root) into the
        same arrays, topologically ordered (parents first), siblings contiguous and best-first.
        """
        parents = parents.detach().cpu()
        cond = self._conditional(scores, parents)
        out = cond.clone()
        # Topological order: each pass resolves one more level of the products.
        has_parent = parents >= 0
        while True:
            new = torch.where(has_parent, cond * out[parents.clamp(min=0)], cond)
            if torch.equal(new, out):
                return out.float()
            out = new


@dataclass
class RoundCostModel:
    """Expected-tokens-per-second model of one speculative round (all times in seconds).

    Attributes:
        verify_times: ``{tree size n (root included): seconds of the target's tree forward}``, >= 1 entry.
        step: running mean of one draft level (batched drafter forward + LM head + tree expansion).
        fixed: running mean of the per-round work that does not depend on the tree (acceptance, target KV
            compaction, the drafter forward that extends its cache over the accepted tokens).
        calibration: measured acceptance rates by draft probability (``None``: trust the draft probabilities).
    """

    verify_times: Mapping[int, float]
    step: RunningMean = field(default_factory=RunningMean)
    fixed: RunningMean = field(default_factory=RunningMean)
    calibration: AcceptanceCalibration | None = field(default_factory=AcceptanceCalibration)

    def __post_init__(self):
        if not self.verify_times:
            raise ValueError("verify_times needs at least one (size, seconds) entry")
        for n, t in self.verify_times.items():
            if isinstance(n, bool) or int(n) != n or n < 1 or not (t >= 0) or math.isinf(t):
                raise ValueError(f"verify_times must map sizes >= 1 to finite seconds >= 0, got {n!r}: {t!r}")
        self._sizes = sorted(int(n) for n in self.verify_times)
        self._times = [float(self.verify_times[n]) for n in self._sizes]
        self._curve = torch.zeros(0)

    def verify_curve(self, max_size: int) -> Tensor:
        """``verify_time(n)`` for ``n = 0 .. max_size`` (cached: rounds ask for it at every draft level)."""
        if self._curve.numel() <= max_size:
            self._curve = torch.tensor([self.verify_time(n) for n in range(max(int(max_size), 1) + 1)])
        return self._curve[: max_size + 1]

    # --------------------------------------------------------------------------------------- primitives
    def verify_time(self, n: int) -> float:
        """Target tree-forward seconds for ``n`` nodes: piecewise-linear between timed sizes, linear beyond."""
        s, t = self._sizes, self._times
        if len(s) == 1:
            return t[0] * n / s[0]
        i = bisect.bisect_left(s, n)
        if i < len(s) and s[i] == n:
            return t[i]
        i = min(max(i, 1), len(s) - 1)  # the segment [s[i-1], s[i]], extended at both ends
        slope = (t[i] - t[i - 1]) / (s[i] - s[i - 1])
        return max(0.0, t[i - 1] + slope * (n - s[i - 1]))

    @staticmethod
    def expected_tokens(sorted_probs: Tensor) -> Tensor:
        """``E(n)`` for ``n = 1 .. len+1``: 1 + the ``n - 1`` largest node acceptance probabilities."""
        return 1.0 + torch.cat([sorted_probs.new_zeros(1), torch.cumsum(sorted_probs, 0)])

    @staticmethod
    def _values(node_logprobs: Tensor, node_probs: Tensor | None) -> Tensor:
        """Acceptance probabilities of the nodes: ``node_probs`` when given, else ``exp(node_logprobs)``."""
        return (node_logprobs.exp() if node_probs is None else node_probs).detach().float().cpu()

    def _expected(self, node_logprobs: Tensor, node_probs: Tensor | None) -> Tensor:
        """``E(n)`` in the order the tree builder keeps nodes (by cumulative draft log-prob, best first)."""
        order = torch.sort(node_logprobs.detach().float().cpu(), descending=True, stable=True).indices
        return self.expected_tokens(self._values(node_logprobs, node_probs)[order])

    def _rates(self, expected: Tensor, seconds: float, max_size: int) -> tuple[int, float]:
        """Best ``(n, expected[n-1] / (seconds + verify(n)))`` over ``2 <= n <= min(max_size, len(expected))``."""
        upper = max(2, min(int(max_size), expected.numel()))
        if expected.numel() < upper:  # no drafted node at all: n = 2 is still the smallest real tree
            expected = torch.cat([expected, expected[-1:].expand(upper - expected.numel())])
        rates = expected[1:upper] / (seconds + self.verify_curve(upper)[2:]).clamp(min=1e-9)
        i = int(torch.argmax(rates))
        return i + 2, float(rates[i])

    def best_size(
        self, node_logprobs: Tensor, draft_seconds: float, max_size: int, node_probs: Tensor | None = None
    ) -> tuple[int, float]:
        """``(n, expected tokens per second)`` maximising ``E(n) / (fixed + draft + verify(n))``, 2 <= n <= max_size.

        ``node_logprobs``: cumulative draft log-probs of every drafted node (the root excluded), which decide the
        order nodes are kept in; ``node_probs``: their acceptance probabilities (default: ``exp(node_logprobs)``,
        or calibrated ones from :meth:`AcceptanceCalibration.path_probs`).
        """
        expected = self._expected(node_logprobs, node_probs)
        return self._rates(expected, (self.fixed.value or 0.0) + float(draft_seconds), max_size)

    def _best_rate(self, sorted_values: Tensor, seconds: float, max_size: int) -> float:
        return self._rates(self.expected_tokens(sorted_values), seconds, max_size)[1]

    def worth_another_level(
        self,
        node_logprobs: Tensor,
        frontier_probs: Tensor,
        child_prob: float,
        draft_seconds: float,
        max_size: int,
        node_probs: Tensor | None = None,
    ) -> bool:
        """Whether drafting one more level is expected to raise tokens per second.

        The next level's most valuable nodes are the frontier nodes' best children; with ``child_prob`` the
        typical acceptance probability of a node's best child (measured at the level just drafted), the child
        of a frontier node of acceptance probability ``p`` is worth about ``child_prob * p`` expected tokens.
        Those children compete with the nodes drafted so far for the ``max_size`` verification slots (a flat
        verification cost otherwise fills the cap with unlikely siblings and leaves no room to go deeper). The
        level pays if the best rate over sizes, with one more draft step, beats the best rate reachable now.
        Deeper levels add less (a child is never likelier than its parent), so this one-level look-ahead is
        enough. Before a draft step has been timed the answer is yes (measure first).
        """
        if self.step.value is None:
            return True
        _, rate_now = self.best_size(node_logprobs, draft_seconds, max_size, node_probs)
        children = frontier_probs.detach().float().cpu() * float(child_prob)
        combined = torch.sort(torch.cat([self._values(node_logprobs, node_probs), children]), descending=True).values
        base = (self.fixed.value or 0.0) + draft_seconds + self.step.value
        return self._best_rate(combined, base, max_size) > rate_now


# ------------------------------------------------------------------------------------- end-to-end speedup model
def end_to_end_speedup(new_tokens: float, sigma: float, round_steps: float, prefill_steps: float) -> float:
    """Predicted wall-time speedup over autoregressive decoding of one request, in units of one AR step.

    AR: ``prefill + (new_tokens - 1)`` steps (the prefill emits the first token). Speculative: the same prefill plus
    ``new_tokens / sigma - 1`` verification rounds (sigma counts the prefill as a round, as
    :class:`~.speculative.SpecStats` does) of ``round_steps`` AR steps each (draft + verify + bookkeeping).
    ``prefill_steps`` = prefill time / AR step time.
    """
    if new_tokens < 1 or sigma < 1 or round_steps <= 0 or prefill_steps < 0:
        raise ValueError("need new_tokens >= 1, sigma >= 1, round_steps > 0 and prefill_steps >= 0")
    rounds = max(new_tokens / sigma - 1.0, 0.0)
    return (prefill_steps + new_tokens - 1.0) / (prefill_steps + rounds * round_steps)


def round_steps_for_speedup(speedup: float, new_tokens: float, sigma: float, prefill_steps: float) -> float:
    """The round cost (in AR steps) at which :func:`end_to_end_speedup` reaches ``speedup``; ``0.0`` (or less)
    means no round cost can, because the prefill alone already takes more than the allowed time."""
    rounds = new_tokens / sigma - 1.0
    if speedup <= 0 or rounds <= 0:
        raise ValueError("need speedup > 0 and new_tokens / sigma > 1 (at least one verification round)")
    return ((prefill_steps + new_tokens - 1.0) / speedup - prefill_steps) / rounds
