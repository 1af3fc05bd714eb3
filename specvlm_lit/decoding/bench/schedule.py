"""In which order the methods run on one prompt: a balanced rotation, so no method always follows another.

If the order were fixed, the method that always runs right after a heavy one (or first, right after the previous
prompt's last method) would pay for cache, allocator and turbo effects the others never see. The benchmark
therefore cycles through the rows of a Williams design (a Latin square balanced for first-order carry-over):
over one cycle every method runs in every position equally often, and every ordered pair ``(a, b)`` of methods
has ``b`` right after ``a`` equally often (once per cycle of ``n`` rows for an even number ``n`` of methods; for an
odd ``n`` the design needs ``2n`` rows, each pair twice). The order is deterministic: the same settings always
run the same sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["balanced_orders", "order_for_round"]


def balanced_orders(methods: Sequence[str]) -> list[list[str]]:
    """The rows of a Williams design over ``methods`` (see the module doc); one row for a single method."""
    n = len(methods)
    if n <= 1:
        return [list(methods)]
    # First row 0, 1, n-1, 2, n-2, ...: its successive differences are all distinct mod n, so its cyclic shifts
    # put every ordered pair next to each other exactly once (n even).
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        if len(first) % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    rows = [[(i + shift) % n for i in first] for shift in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [[methods[i] for i in row] for row in rows]


def order_for_round(methods: Sequence[str], round_index: int) -> list[str]:
    """The methods' order in timing round ``round_index`` (a round = one prompt, one repeat)."""
    rows = balanced_orders(methods)
    return rows[round_index % len(rows)]
