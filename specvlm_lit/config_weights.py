"""Does a saved model's ``config.json`` describe its weights? Checked from the safetensors headers, before loading.

transformers builds a model from ``config.json`` and then copies the weights in. After an edit of the config (a
wrong ``hidden_size``, a deleted key, a string where a number belongs) it prints a load report of tens of lines and
raises an error that names a tensor or a transformers internal, never the field. The checks here run first, on the
safetensors headers alone (no tensor data is read), and raise ONE error naming the file, the field, its value, what
the weights say and the fix. Each model family lists the sizes its weights pin down as :class:`ShapeFact` s
(:meth:`specvlm_lit.target.TargetAdapter.shape_facts`, ``specvlm_lit.drafter.eagle._DRAFTER_FACTS``).

:func:`quiet_load_report` silences transformers' report for the load that follows the checks: the callers turn
every case the report would describe (missing / unexpected / mismatched weights) into a one-line error of their own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = [
    "ShapeFact",
    "attention_shape_facts",
    "check_integer_fields",
    "check_shapes",
    "mismatch_summary",
    "quiet_load_report",
]

#: Fields whose ``null`` is meaningful ("derive it from the other sizes"), so only their type is checked.
_NULLABLE = frozenset({"head_dim", "num_key_value_heads"})

Lookup = Callable[[str], Any]


@dataclass(frozen=True)
class ShapeFact:
    """One size the weights pin down: dimension ``dim`` of the first tensor whose name matches ``tensor``.

    ``fields``: dotted ``config.json`` paths the size is computed from (``"text_config.hidden_size"``); the first
    is the one blamed. ``expected(value)`` computes the size from the values the model would be built with
    (``value(field)``); by default it is the one field's value. ``dim=None`` counts instead the distinct values of
    the regex's first group (layer indices). ``formula`` says how ``expected`` combines the fields, for the message.
    """

    fields: tuple[str, ...]
    tensor: str
    dim: int | None
    expected: Callable[[Lookup], int] | None = None
    formula: str = ""

    def expected_size(self, value: Lookup) -> int:
        return int(self.expected(value) if self.expected is not None else value(self.fields[0]))


def attention_shape_facts(
    layer: str, head_dim: Callable[[Lookup], int], field_prefix: str = "", *, kv_heads_nullable: bool = False
) -> tuple[ShapeFact, ShapeFact]:
    """The two sizes one attention layer's weights pin down: ``q_proj`` rows = heads x head_dim and ``k_proj`` rows
    = kv_heads x head_dim.

    ``layer``: regex of the layer's weight-name prefix, ending in ``\\.`` (``r"^layers\\.0\\."``); ``head_dim``: the
    model's own head-dim rule; ``field_prefix``: where the attention fields sit in config.json (``"text_config."``).
    ``kv_heads_nullable``: a null ``num_key_value_heads`` means "as many as the attention heads" (the drafters read
    it unresolved; targets' config classes resolve it themselves).
    """
    heads, kv_heads, dim = (field_prefix + f for f in ("num_attention_heads", "num_key_value_heads", "head_dim"))

    def kv_count(v: Lookup) -> int:
        return (v(kv_heads) or v(heads)) if kv_heads_nullable else v(kv_heads)

    return (
        ShapeFact(
            (heads, dim),
            layer + r"self_attn\.q_proj\.weight$",
            0,
            lambda v: v(heads) * head_dim(v),
            "num_attention_heads x head_dim",
        ),
        ShapeFact(
            (kv_heads, dim),
            layer + r"self_attn\.k_proj\.weight$",
            0,
            lambda v: kv_count(v) * head_dim(v),
            "num_key_value_heads x head_dim",
        ),
    )


def raw_lookup(raw: Mapping, field: str) -> tuple[bool, Any]:
    """``(present, value)`` of a dotted ``field`` in the parsed ``config.json``."""
    node: Any = raw
    for part in field.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_integer_fields(
    config_file: Path, raw: Mapping, facts: Sequence[ShapeFact], error: type[UserError], fix: str
) -> None:
    """Every size field the ``facts`` use is an integer where ``config.json`` sets it (``true`` is not one)."""
    for fact in facts:
        for field in fact.fields:
            present, v = raw_lookup(raw, field)
            if not present or type(v) is int or (v is None and field.rsplit(".", 1)[-1] in _NULLABLE):
                continue
            raise error(
                f"{config_file}: {field} must be an integer, got {v!r} ({type(v).__name__}). Write it as a JSON "
                f"number without quotes, or {fix}"
            )


def _observe(fact: ShapeFact, shapes: Mapping[str, Sequence[int]]) -> tuple[int, str] | None:
    """``(size the weights say, evidence for the message)``, or ``None`` when no tensor matches the fact."""
    pattern = re.compile(fact.tensor)
    if fact.dim is not None:
        for name in sorted(shapes):
            if pattern.search(name) and len(shapes[name]) > fact.dim:
                shape = list(shapes[name])
                return int(shape[fact.dim]), f"{name} has shape {shape}"
        return None
    indices: dict[int, str] = {}
    for name in shapes:
        m = pattern.search(name)
        if m:
            indices.setdefault(int(m.group(1)), name[: m.start(1)] + "N" + name[m.end(1) : m.end()].rstrip("."))
    if not indices:
        return None
    prefix = next(iter(indices.values()))
    return len(indices), f"they hold {prefix} for {len(indices)} values of N ({min(indices)}..{max(indices)})"


def check_shapes(
    config_file: Path,
    raw: Mapping,
    value: Lookup,
    shapes: Mapping[str, Sequence[int]],
    facts: Sequence[ShapeFact],
    error: type[UserError],
    fix: str,
) -> None:
    """Raise ``error`` for the first fact whose size from the config (``value``: what the model would be built
    with, defaults included) differs from the weights (``shapes``: tensor name -> shape). Facts whose tensor the
    checkpoint lacks are skipped (missing weights are reported by the load itself)."""
    for fact in facts:
        seen = _observe(fact, shapes)
        if seen is None:
            continue
        observed, evidence = seen
        expected = fact.expected_size(value)
        if expected == observed:
            continue
        field = fact.fields[0]
        present, _ = raw_lookup(raw, field)
        if len(fact.fields) == 1:
            said = f"{field} is {expected}" if present else f"{field} is missing, so the default {expected} applies,"
            hint = f"set {field} to {observed}" if present else f"add {field}: {observed}"
            raise error(f"{config_file}: {said} but the weights say {observed} ({evidence}). Fix: {hint}, or {fix}")
        parts = ", ".join(
            f"{f}={value(f)}" + ("" if raw_lookup(raw, f)[0] else " (missing: default)") for f in fact.fields
        )
        raise error(
            f"{config_file}: {fact.formula or ' x '.join(fact.fields)} = {expected} ({parts}) but the weights say "
            f"{observed} ({evidence}). Fix: correct {field}, or {fix}"
        )


def mismatch_summary(mismatched: Sequence) -> str:
    """``name: checkpoint [..] vs config [..]`` for transformers' ``mismatched_keys`` (first three)."""
    rows = sorted(mismatched, key=lambda row: str(row[0]))
    shown = "; ".join(f"{name}: checkpoint {list(ckpt)} vs config {list(model)}" for name, ckpt, model in rows[:3])
    return shown + (f"; and {len(rows) - 3} more" if len(rows) > 3 else "")


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextmanager
def quiet_load_report():
    """Drop transformers' per-tensor LOAD REPORT (a warning of ``transformers.modeling_utils``) during one load.

    The callers check ``output_loading_info`` themselves and raise a one-line error for every case the report would
    list, so the report would only bury that line under tens of others. A filter, not a raised logger level: in
    transformers 5.23 a level >= WARNING on that logger switches on an unrelated tensor-parallel warning.
    """
    log = logging.getLogger("transformers.modeling_utils")
    log.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        log.removeFilter(_not_a_load_report)


def load_pretrained_checked(model_class, path: Path, error_cls: type[Exception], fix: str, **kwargs):
    """``model_class.from_pretrained(path)`` from local files, returning ``(model, loading info)``.

    The load report is silenced (:func:`quiet_load_report`); a failure, or weights whose sizes disagree with
    ``config.json``, raise ``error_cls`` in one line ending in ``fix``. Missing / unexpected weights are left in the
    returned info for the caller, whose rules for them differ (a target may carry unused weights, a drafter not).
    """
    kwargs = {"local_files_only": True, "output_loading_info": True, "ignore_mismatched_sizes": True, **kwargs}
    try:
        with quiet_load_report():
            model, info = model_class.from_pretrained(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with context: any failure here means a bad checkpoint
        raise error_cls(f"failed to load {path} ({type(e).__name__}: {' '.join(str(e).split())}). {fix}") from e
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        raise error_cls(
            f"the weights in {path} do not match {path / 'config.json'} ({mismatch_summary(mismatched)}). {fix}"
        )
    return model, info
