"""What one benchmark run measures (:class:`BenchSettings`), validated from ``conf/decode/decode.yaml`` without torch.

The value rules are not restated here: integers go through :func:`~specvlm_lit.decoding.pipeline.check_int_option`,
sampling and tree options through the :mod:`~specvlm_lit.decoding.configs` dataclasses, each broken rule reported as
a :class:`~specvlm_lit.decoding.pipeline.DecodeInputError` naming the option as typed (``bench.warmup``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..configs import WarpConfig, check_bool
from ..pipeline import (
    DecodeInputError,
    as_decode_input_error,
    check_dtype,
    check_int_option,
    check_max_new_tokens,
    check_sampling,
    check_seed,
    check_target_dir,
    check_tree,
    drafter_kind,
)
from .methods import DRAFTER_KINDS, METHODS

__all__ = ["EMBEDDED_ASSISTANT", "BenchSettings", "settings_from_config"]

EMBEDDED_ASSISTANT = "data/embedded_assistant"  # built by recipes/embedded_target/conf/assistant_recipe.yaml


@dataclass
class BenchSettings:
    target: str
    out_dir: str
    test_urls: list[str]
    corpus_dir: str | None = None
    # The user's own prompts (a JSONL of {image, prompt[, category]} or shards, :mod:`.prompts`) instead of the
    # synthetic test split; then resolutions, samples_per_resolution, tasks and test_urls do not apply.
    prompts: str | None = None
    limit: int | None = None  # at most this many of bench.prompts (the first ones); None = all
    outputs_root: str | None = None  # where train.py exports live (drafter discovery)
    resolutions: list[int] = field(default_factory=lambda: [64, 128])
    samples_per_resolution: int = 8
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])
    max_new_tokens: int = 64
    tasks: list[str] | None = None  # task types of the test samples to keep (None = all); [describe] = long answers
    repeats: int = 3  # timed runs of every (prompt, method), interleaved (tau pairs them run by run)
    # Batch rows (T = 0): throughput of HF batched generate() vs batched speculative decoding per batch size; [] = none.
    batch_sizes: list[int] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    drafters: dict = field(default_factory=lambda: {"eaglevlm": None, "specvlm": None})
    assistant: str | None = None
    assistant_auto: bool = False  # picked by bench.assistant=auto: a mismatch skips the row instead of failing
    prompt_lookup_num_tokens: int = 10
    prompt_lookup_suppress_image_token: bool = True
    warmup: int = 1
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = 0
    tree: dict = field(default_factory=lambda: {"top_k": 10, "depth": 7, "total_tokens": 60})
    dtype: str = "float32"
    device: str = "cpu"


# BenchSettings fields that are not `bench.*` options: set from the top level of the config (or derived).
NOT_BENCH_OPTIONS = {
    "target",
    "out_dir",
    "outputs_root",
    "assistant_auto",
    "top_p",
    "top_k",
    "seed",
    "tree",
    "dtype",
    "device",
}


def _int_list(value, name: str, minimum: int) -> list[int]:
    """A non-empty list of integers ``>= minimum`` (a single integer counts as a list of one)."""
    items = [value] if value is None or isinstance(value, (int, str)) else list(value)
    if not items:
        raise DecodeInputError(f"{name} must not be empty")
    return [check_int_option(x, f"{name}[{i}]", minimum) for i, x in enumerate(items)]


def _batch_sizes(value) -> list[int]:
    """``bench.batch_sizes``: null / [] (no batch rows) or integers >= 1 (a single integer counts as a list of one)."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return []
    return sorted(set(_int_list(value, "bench.batch_sizes", 1)))


def _methods(value) -> list[str]:
    methods = list([value] if isinstance(value, str) else (value or []))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise DecodeInputError(f"bench.methods must be a non-empty subset of {list(METHODS)}, got {methods!r}")
    if "ar" not in methods:
        methods = ["ar"] + methods  # the baseline every ratio is computed against
    return [m for m in METHODS if m in methods]  # canonical order, AR first


def _temperatures(value) -> list[float]:
    temps = [value] if isinstance(value, (int, float, str)) else list(value or [])
    if not temps:
        raise DecodeInputError("bench.temperatures must not be empty")
    checked = []
    for i, t in enumerate(temps):
        with as_decode_input_error({"temperature": f"bench.temperatures[{i}]"}):
            checked.append(WarpConfig(temperature=t).temperature)
    return sorted(set(checked))


def _tasks(value) -> list[str] | None:
    """``None`` (every task type) or a non-empty list of task names (a single name counts as a list of one)."""
    if value is None:
        return None
    tasks = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise DecodeInputError(
            f"bench.tasks must be null (every task) or a non-empty list of task names such as [describe], got {value!r}"
        )
    return tasks


def _prompts(value, limit) -> tuple[str | None, int | None]:
    """``bench.prompts`` (a path or pattern; its content is read by :mod:`.prompts`) and ``bench.limit``."""
    if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value).strip()):
        raise DecodeInputError(
            f"bench.prompts must be a JSONL file or a directory / brace pattern of shards, got {value!r}"
        )
    limit = check_int_option(limit, "bench.limit", 1, allow_none=True, hint=" or null (every prompt)")
    if limit is not None and value is None:
        raise DecodeInputError(
            "bench.limit caps how many of bench.prompts are used, and bench.prompts is not set; for the synthetic "
            "test split use bench.samples_per_resolution"
        )
    return (None if value is None else str(value)), limit


def _drafters(b: Mapping, cfg: Mapping) -> dict[str, str | None]:
    """``bench.drafters`` per kind; a top-level ``drafter=<dir>`` fills the slot of its kind when that is unset."""
    drafters = dict(b.get("drafters") or {})
    unknown = set(drafters) - set(DRAFTER_KINDS)
    if unknown:
        raise DecodeInputError(f"bench.drafters accepts only {list(DRAFTER_KINDS)}, got {sorted(unknown)}")
    for k, v in drafters.items():
        if v is not None and not Path(str(v)).expanduser().is_dir():
            raise DecodeInputError(f"bench.drafters.{k}: drafter directory {v} does not exist")
    top = cfg.get("drafter")  # decode.py's drafter=<dir> fills the slot of its kind
    if top is not None:
        try:
            kind = drafter_kind(json.loads((Path(str(top)).expanduser() / "config.json").read_text()))
        except (OSError, ValueError) as e:
            raise DecodeInputError(f"drafter {top}: cannot read its config.json ({e})") from None
        if kind in DRAFTER_KINDS and drafters.get(kind) is None:
            drafters[kind] = str(top)
    return {k: drafters.get(k) for k in DRAFTER_KINDS}


def _assistant(value, root: str | os.PathLike) -> tuple[str | None, bool]:
    """``(assistant dir or None, picked by "auto")``; ``auto`` = the embedded assistant when it was built (it only
    fits the embedded target)."""
    if value == "auto":
        built = Path(root) / EMBEDDED_ASSISTANT
        return (str(built) if (built / "config.json").is_file() else None), True
    if value is not None and not Path(str(value)).expanduser().is_dir():
        raise DecodeInputError(f"bench.assistant: assistant directory {value} does not exist")
    return (None if value is None else str(value)), False


def settings_from_config(cfg: Mapping, out_dir: str, root: str | os.PathLike) -> BenchSettings:
    """Validate the ``bench`` block + top-level options of ``conf/decode/decode.yaml`` (no model work, no torch)."""
    b = dict(cfg.get("bench") or {})
    unknown = set(b) - (set(BenchSettings.__dataclass_fields__) - NOT_BENCH_OPTIONS)
    if unknown:
        raise DecodeInputError(f"unknown bench option(s) {sorted(unknown)}")
    methods = _methods(b.get("methods", list(METHODS)))
    temps = _temperatures(b.get("temperatures", [0.0, 1.0]))
    prompts, limit = _prompts(b.get("prompts"), b.get("limit"))
    urls = b.get("test_urls")
    if isinstance(urls, str):
        urls = [urls]
    if not urls and prompts is None:
        raise DecodeInputError("bench.test_urls is empty: point it at the held-out test shards (test-*.tar)")
    drafters = _drafters(b, cfg)
    assistant, assistant_auto = _assistant(b.get("assistant"), root)
    n_pl = check_int_option(b.get("prompt_lookup_num_tokens", 10), "bench.prompt_lookup_num_tokens", 1)
    warmup = check_int_option(b.get("warmup", 1), "bench.warmup", 0)
    repeats = check_int_option(b.get("repeats", 3), "bench.repeats", 1)
    with as_decode_input_error():
        suppress = check_bool(
            b.get("prompt_lookup_suppress_image_token", True), "bench.prompt_lookup_suppress_image_token"
        )
    warp = check_sampling(1.0, cfg.get("top_p", 1.0), cfg.get("top_k", 0))
    dtype = check_dtype(cfg.get("dtype", "float32"), "dtype")
    target = check_target_dir(cfg.get("target"))
    return BenchSettings(
        target=target,
        out_dir=str(out_dir),
        test_urls=[str(u) for u in urls or []],
        corpus_dir=None if b.get("corpus_dir") is None else str(b["corpus_dir"]),
        prompts=prompts,
        limit=limit,
        outputs_root=str(Path(root) / "outputs"),
        resolutions=_int_list(b.get("resolutions", [64, 128]), "bench.resolutions", 1),
        samples_per_resolution=check_int_option(b.get("samples_per_resolution", 8), "bench.samples_per_resolution", 1),
        temperatures=temps,
        max_new_tokens=check_max_new_tokens(b.get("max_new_tokens", 64), "bench.max_new_tokens"),
        tasks=_tasks(b.get("tasks")),
        repeats=repeats,
        batch_sizes=_batch_sizes(b.get("batch_sizes")),
        methods=methods,
        drafters=drafters,
        assistant=assistant,
        assistant_auto=assistant_auto,
        prompt_lookup_num_tokens=n_pl,
        prompt_lookup_suppress_image_token=suppress,
        warmup=warmup,
        top_p=warp.top_p,
        top_k=warp.top_k,
        seed=check_seed(cfg.get("seed", 0)),
        tree=check_tree(dict(cfg.get("tree") or {})),
        dtype=dtype,
        device=str(cfg.get("device", "cpu")),
    )
