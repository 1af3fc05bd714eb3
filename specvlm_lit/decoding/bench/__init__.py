"""Decoding benchmark: HF AR vs own AR vs HF prompt lookup vs HF assisted vs EagleVLM vs SpecVLM, in one process.

``python decode.py mode=bench`` calls :func:`run_benchmark`. For every temperature, resolution and held-out test
sample, every method decodes the *same* prompt ``repeats`` times, interleaved: one round = every method once, in
an order that rotates from round to round (:mod:`.schedule`), after ``warmup`` untimed runs per method and
temperature. ``bench.prompts`` replaces the held-out test samples with the user's own (a JSONL of ``{image,
prompt[, category]}`` or shards, :mod:`.prompts`), each image at its own size. Per run we record the wall time
(image encoding included for every method), new tokens, time to first token, target forwards, drafter visual tokens
and draft KV length, and whether the greedy output equals the AR output. Aggregates per method x temperature (and
per task type, or the user prompts' category, and resolution), the load average before and after the timed runs
and the warnings go to ``bench.json``, ``bench.md`` and ``bench.png`` in the output directory.

Definitions (also in docs/decoding.md and docs/benchmarks.md):

* ``tau`` = the median over prompts of the paired ratio AR time / method time (same prompt, same repeat; the
  median over repeats per prompt), with a distribution-free 95% interval ``tau_ci`` (:mod:`.stats`); AR = 1.
  ``tau_own`` is the same against this project's own AR loop (``ar_own``), so speculation's gain is separate from
  a leaner loop's. ``tau_total`` = sum of AR times / sum of method times (the definition of earlier reports).
* ``sigma`` = new tokens / target forwards that emitted them. Speculative: the prefill + every tree verification
  (``SpecStats.rounds``). HF methods: forwards of the target model counted with a forward hook (the assistant's own
  forwards are not counted). AR = 1.
* ``ttft_ms``: HF methods: wall time of a separate ``max_new_tokens=1`` call on the same input (image encoding +
  prefill); own AR and speculative: ``SpecStats.time_prefill`` (image encoding + target prefill + first token).
* ``identical``: fraction of greedy (T = 0) outputs token-identical to the AR output; ``null`` at T > 0 (samples
  differ by design; losslessness there is a statement about distributions, tested in tests/test_speculative.py).
* warnings (:mod:`.load`): the machine was busy before / during the timed runs, the AR times moved across repeats,
  or too few prompts for a 95% interval. Printed on the console too.

Modules, one concern each: :mod:`.methods` (the methods and their labels), :mod:`.settings` (``bench.*`` options
-> :class:`BenchSettings`), :mod:`.samples` (held-out test samples), :mod:`.prompts` (the user's
own prompts), :mod:`.baselines` (the Hugging Face
baselines, and how prompt lookup and assisted decoding are made to work on LLaVA), :mod:`.schedule` (the method
order per round), :mod:`.runner` (loading and timing), :mod:`.stats` (paired ratios, median and interval),
:mod:`.load` (load average and busy-machine warnings), :mod:`.aggregate` (tau, sigma, breakdown) and
:mod:`.report` (bench.json / bench.md / bench.png).
"""

from .methods import LABELS, METHODS
from .runner import run_benchmark
from .samples import collect_samples
from .settings import EMBEDDED_ASSISTANT, BenchSettings, settings_from_config

__all__ = [
    "EMBEDDED_ASSISTANT",
    "LABELS",
    "METHODS",
    "BenchSettings",
    "collect_samples",
    "run_benchmark",
    "settings_from_config",
]
