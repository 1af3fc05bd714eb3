"""Was the machine busy while the benchmark ran? Load averages before / after the timed runs and the rules that turn
them (and the spread of repeated AR runs) into warnings.

The rules (documented in docs/benchmarks.md):

* **busy before**: the 1-minute load average just before the timed runs exceeds ``cores - threads + 0.5``
  (``threads`` = the benchmark's torch threads, at most ``cores``): fewer cores were free than the benchmark uses.
* **busy after**: the 1-minute load average right after the timed runs exceeds ``cores + 0.5``. The benchmark's
  own threads count in this reading, so only a load beyond what the cores can serve is flagged.
* **unstable timings**: the AR baseline's time spread across repeats (the median over prompts of
  ``(max - min) / median`` of a prompt's AR times, :func:`~.stats.relative_spread`) exceeds
  :data:`AR_SPREAD_LIMIT` at some temperature. Needs ``bench.repeats >= 2``.

``cores`` is ``os.cpu_count()``: the load average counts runnable tasks of the whole machine.
"""

from __future__ import annotations

import os

__all__ = ["AR_SPREAD_LIMIT", "LOAD_MARGIN", "load_average", "load_report"]

LOAD_MARGIN = 0.5
# A judgement, not a measured figure: repeats of one run on a quiet machine should sit far closer than this.
AR_SPREAD_LIMIT = 0.25


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or ``None`` where the platform has none (Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def load_report(
    before: list[float] | None,
    after: list[float] | None,
    cores: int | None,
    torch_threads: int,
    ar_spread: dict[str, float | None],
) -> dict:
    """The ``load`` block of bench.json: the readings, the thresholds applied, ``busy`` and the warnings.

    ``ar_spread`` maps a temperature key to the AR baseline's spread across repeats (``None``: not measurable).
    """
    cores = int(cores or 1)
    threads = max(1, min(int(torch_threads), cores))
    before_limit = cores - threads + LOAD_MARGIN
    after_limit = cores + LOAD_MARGIN
    warnings = []
    if before is not None and before[0] > before_limit:
        warnings.append(
            f"the machine was busy before the timed runs: 1-minute load average {before[0]:.2f} on {cores} cores "
            f"(limit {before_limit:.1f} for {threads} torch thread(s)); ratios may not hold on an idle machine"
        )
    if after is not None and after[0] > after_limit:
        warnings.append(
            f"the machine was busy during the timed runs: 1-minute load average {after[0]:.2f} at the end on "
            f"{cores} cores (limit {after_limit:.1f}, the benchmark's own threads included)"
        )
    for tk, spread in ar_spread.items():
        if spread is not None and spread > AR_SPREAD_LIMIT:
            warnings.append(
                f"unstable timings at T = {float(tk):g}: repeated AR runs of the same prompt differed by "
                f"{spread:.0%} (median over prompts of (max - min) / median; limit {AR_SPREAD_LIMIT:.0%})"
            )
    return {
        "cores": cores,
        "torch_threads": int(torch_threads),
        "loadavg_before": before,
        "loadavg_after": after,
        "limits": {"load1_before": before_limit, "load1_after": after_limit, "ar_spread": AR_SPREAD_LIMIT},
        "ar_spread": ar_spread,
        "busy": bool(warnings),
        "warnings": warnings,
    }
