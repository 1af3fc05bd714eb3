"""Decoding benchmark: AR vs HF prompt lookup vs HF assisted vs EagleVLM vs SpecVLM, side by side in one process.

``python decode.py mode=bench`` calls :func:`run_benchmark`. For every temperature, resolution and held-out test
sample, every method decodes the *same* prompt right after the others (so machine load drifts hit all methods
alike), after ``warmup`` untimed runs per method and temperature. Per run we record the wall time (image encoding
included for every method), new tokens, time to first token, target forwards, drafter visual tokens and draft KV
length, and whether the greedy output equals the AR output. Aggregates per method x temperature (and per task type
and resolution) go to ``bench.json``, ``bench.md`` and ``bench.png`` in the output directory.

Definitions (also in docs/decoding.md):

* ``tau`` = sum of AR wall times / sum of the method's wall times over the same samples (AR = 1).
* ``sigma`` = new tokens / target forwards that emitted them. Speculative: the prefill + every tree verification
  (``SpecStats.rounds``). HF methods: forwards of the target model counted with a forward hook (the assistant's own
  forwards are not counted). AR = 1.
* ``ttft_ms``: HF methods: wall time of a separate ``max_new_tokens=1`` call on the same input (image encoding +
  prefill); speculative: ``SpecStats.time_prefill`` (image encoding + target prefill + first token).
* ``identical``: fraction of greedy (T = 0) outputs token-identical to the AR output; ``null`` at T > 0 (samples
  differ by design; losslessness there is a statement about distributions, tested in tests/test_speculative.py).

Modules, one concern each: :mod:`.methods` (the methods and their labels), :mod:`.settings` (``bench.*`` options
-> :class:`BenchSettings`), :mod:`.samples` (held-out test samples), :mod:`.baselines` (the Hugging Face
baselines, and how prompt lookup and assisted decoding are made to work on LLaVA), :mod:`.runner` (loading and
timing), :mod:`.aggregate` (tau, sigma, breakdown) and :mod:`.report` (bench.json / bench.md / bench.png).
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
