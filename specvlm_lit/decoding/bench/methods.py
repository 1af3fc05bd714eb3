"""The decoding methods the benchmark compares, their groups and their display names."""

from __future__ import annotations

HF_METHODS = ("ar", "prompt_lookup", "assisted")  # Hugging Face generate() and its two built-in accelerations
# This project's own autoregressive loop (specvlm_lit/decoding/autoregressive.py): the same adapter, caches and
# kernels as the speculative decoder, so "speculative vs ar_own" is the gain from speculation alone.
OWN_AR = "ar_own"
BASELINES = ("ar", OWN_AR)  # every speedup is reported against each of these that ran
DRAFTER_KINDS = ("eaglevlm", "specvlm")
# *_adaptive: the same drafter with cost-aware trees (tree.adaptive=true, specvlm_lit/decoding/cost_model.py).
SPEC_METHODS = DRAFTER_KINDS + ("eaglevlm_adaptive", "specvlm_adaptive")
METHODS = ("ar", OWN_AR, "prompt_lookup", "assisted") + SPEC_METHODS  # the canonical order of every table, AR first
LABELS = {
    "ar": "AR (HF generate)",
    OWN_AR: "AR (own loop)",
    "prompt_lookup": "HF prompt lookup",
    "assisted": "HF assisted",
    "eaglevlm": "EagleVLM",
    "specvlm": "SpecVLM (select)",
    "eaglevlm_adaptive": "EagleVLM, adaptive tree",
    "specvlm_adaptive": "SpecVLM, adaptive tree",
}


def drafter_of(method: str) -> str:
    """The drafter kind a speculative method runs (``specvlm_adaptive`` -> ``specvlm``)."""
    return method.removesuffix("_adaptive")
