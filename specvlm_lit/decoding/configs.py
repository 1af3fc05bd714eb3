"""Decoding options that check themselves: the sampling warp, the draft-tree shape and the value rules behind them.

Every rule on a user-settable decoding value lives here, once. :class:`WarpConfig` and :class:`TreeConfig` (and
the scalar checks :func:`check_int` / :func:`check_bool`) raise :class:`InvalidOption`, a ``ValueError`` that
names the field. :mod:`.pipeline`, the benchmark settings and ``decode.py`` build these objects and re-raise a
broken rule as a :class:`~specvlm_lit.decoding.pipeline.DecodeInputError` that names the field the way the user
spelled it (``tree.depth``, ``bench.temperatures[1]``, ``threads``).

Torch-free on purpose: a CLI can reject a bad value in a fraction of a second, before its heavy imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["InvalidOption", "TreeConfig", "WarpConfig", "check_bool", "check_int", "is_int", "is_number"]


class InvalidOption(ValueError):
    """``value`` breaks the rule of the option ``name``; :meth:`message` words it under another name."""

    def __init__(self, name: str, rule: str, value):
        self.name, self.rule, self.value = name, rule, value
        super().__init__(self.message())

    def message(self, name: str | None = None) -> str:
        return f"{name or self.name} {self.rule}, got {self.value!r}"


def is_int(v) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python, never a valid count here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(value, name: str, minimum: int, *, allow_none: bool = False, hint: str = "") -> int | None:
    """``value`` as an ``int >= minimum``; ``None`` passes when ``allow_none`` (``hint`` then says what it means)."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum:
        raise InvalidOption(name, f"must be an integer >= {minimum}{hint}", value)
    return int(value)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidOption(name, "must be true or false", value)
    return value


@dataclass(frozen=True)
class WarpConfig:
    """Sampling configuration, same meaning as in HF ``generate()``.

    ``temperature == 0`` means greedy decoding (HF ``do_sample=False``);
    ``top_k == 0`` and ``top_p == 1.0`` disable those filters.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t = self.temperature
        if not is_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidOption("temperature", "must be a finite number >= 0 (0 = greedy)", t)
        check_int(self.top_k, "top_k", 0, hint=" (0 = disabled)")
        p = self.top_p
        if not is_number(p) or not (0.0 < p <= 1.0):
            raise InvalidOption("top_p", "must be a number in (0, 1] (1 = disabled)", p)
        # Normalise numeric types so that e.g. temperature=1 behaves as 1.0.
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TreeConfig:
    """Draft-tree shape (SpecVLM / EAGLE-2 defaults).

    Attributes:
        top_k: children proposed per expanded node and frontier width (``>= 1``; ``1`` = a chain).
        depth: draft levels below the root (``>= 1``); at most ``depth + 1`` tokens per round.
        total_tokens: tree size including the root (``>= 2``), or ``"auto"``: chosen once per decoder by
            :func:`~specvlm_lit.decoding.speculative.choose_total_tokens`, which times the target's verification on
            the current device.
        clip_to_budget: draft no deeper than the remaining ``max_new_tokens`` can use (``depth <= remaining - 1``).
            Pure savings: it never changes the output (or its distribution), only skips drafting tokens that would be
            cut anyway. ``False`` drafts full trees (tests use it to exercise budget truncation inside a tree).
        adaptive: cost-aware trees (:mod:`.cost_model`): ``depth`` and ``total_tokens`` become upper bounds and
            every round stops drafting when another level is not expected to pay for itself, then verifies the
            number of nodes that maximises expected tokens per second (from the drafter's path probabilities and
            timings measured on this device). Never changes outputs, only speed.

    A broken rule names the field as ``tree.<field>``: the config key users set (``tree.depth=...``).
    """

    top_k: int = 10
    depth: int = 7
    total_tokens: int | str = 60
    clip_to_budget: bool = True
    adaptive: bool = False

    def __post_init__(self):
        check_int(self.top_k, "tree.top_k", 1)
        check_int(self.depth, "tree.depth", 1)
        t = self.total_tokens
        if not (t == "auto" or (is_int(t) and t >= 2)):
            raise InvalidOption("tree.total_tokens", "must be an integer >= 2 (root included) or 'auto'", t)
        check_bool(self.clip_to_budget, "tree.clip_to_budget")
        check_bool(self.adaptive, "tree.adaptive")

    @property
    def auto(self) -> bool:
        return self.total_tokens == "auto"
