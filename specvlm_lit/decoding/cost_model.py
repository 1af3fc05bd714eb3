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
from dataclasses import dataclass, field
from typing import Mapping

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


@dataclass
class RoundCostModel:
    """Expected-tokens-per-second model of one speculative round (all times in seconds).

    Attributes:
        verify_times: ``{tree size n (root included): seconds of the target's tree forward}``, >= 1 entry.
        step: running mean of one draft level (batched drafter forward + LM head + tree expansion).
        fixed: running mean of the per-round work that does not depend on the tree (acceptance, target KV
            compaction, the drafter forward that extends its cache over the accepted tokens).
    """

    verify_times: Mapping[int, float]
    step: RunningMean = field(default_factory=RunningMean)
    fixed: RunningMean = field(default_factory=RunningMean)

    def __post_init__(self):
        if not self.verify_times:
            raise ValueError("verify_times needs at least one (size, seconds) entry")
        for n, t in self.verify_times.items():
            if isinstance(n, bool) or int(n) != n or n < 1 or not (t >= 0) or math.isinf(t):
                raise ValueError(f"verify_times must map sizes >= 1 to finite seconds >= 0, got {n!r}: {t!r}")
        self._sizes = sorted(int(n) for n in self.verify_times)
        self._times = [float(self.verify_times[n]) for n in self._sizes]

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

    def best_size(self, node_logprobs: Tensor, draft_seconds: float, max_size: int) -> tuple[int, float]:
        """``(n, expected tokens per second)`` maximising ``E(n) / (fixed + draft + verify(n))``, ``2 <= n <= max_size``.

        ``node_logprobs``: cumulative draft log-probs of every drafted node (the root excluded).
        """
        probs = torch.sort(node_logprobs.detach().float().exp().cpu(), descending=True).values
        upper = max(2, min(int(max_size), probs.numel() + 1))
        expected = self.expected_tokens(probs)[:upper].tolist()  # index i -> n = i + 1
        base = (self.fixed.value or 0.0) + float(draft_seconds)
        best_n, best_rate = 2, -1.0
        for n in range(2, upper + 1):
            rate = expected[n - 1] / max(base + self.verify_time(n), 1e-9)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n, best_rate

    def worth_another_level(self, node_logprobs: Tensor, frontier_logprobs: Tensor, child_prob: float,
                            draft_seconds: float, max_size: int) -> bool:
        """Whether drafting one more level is expected to raise tokens per second.

        The next level's most valuable nodes are the frontier nodes' best children; with ``child_prob`` the
        typical probability of a node's best child (measured at the level just drafted), the child of a frontier
        node of probability ``p`` adds about ``child_prob * p`` expected tokens. The level pays if, for some
        ``j``, adding the ``j`` most valuable children beats the best rate reachable now, counting one more draft
        step and ``j`` more verified nodes. Deeper levels add less (a child is never likelier than its parent), so
        this one-level look-ahead is enough. Before a draft step has been timed the answer is yes (measure first).
        """
        if self.step.value is None:
            return True
        n_now, rate_now = self.best_size(node_logprobs, draft_seconds, max_size)
        room = min(frontier_logprobs.numel(), max(0, int(max_size) - n_now))
        if room == 0:
            return False
        probs = torch.sort(node_logprobs.detach().float().exp().cpu(), descending=True).values
        expected_now = float(self.expected_tokens(probs)[n_now - 1])
        gains = torch.sort(frontier_logprobs.detach().float().exp().cpu(), descending=True).values[:room]
        gains = torch.cumsum(gains * float(child_prob), 0).tolist()
        base = (self.fixed.value or 0.0) + draft_seconds + self.step.value
        return any((expected_now + g) / max(base + self.verify_time(n_now + j + 1), 1e-9) > rate_now
                   for j, g in enumerate(gains))
