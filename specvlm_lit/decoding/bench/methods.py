"""The decoding methods the benchmark compares, their groups and their display names."""

from __future__ import annotations

HF_METHODS = ("ar", "prompt_lookup", "assisted")  # Hugging Face generate() and its two built-in accelerations
DRAFTER_KINDS = ("eaglevlm", "specvlm")
# *_adaptive: the same drafter with cost-aware trees (tree.adaptive=true, specvlm_lit/decoding/cost_model.py).
SPEC_METHODS = DRAFTER_KINDS + ("eaglevlm_adaptive", "specvlm_adaptive")
METHODS = HF_METHODS + SPEC_METHODS  # the canonical order of every table, AR first
LABELS = {
    "ar": "AR (HF generate)",
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
