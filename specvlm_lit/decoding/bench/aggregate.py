"""Per-method aggregates of the timed runs: tau (median of paired ratios, with a 95% interval) against each AR
baseline, sigma, tokens/s, TTFT, identical-to-AR, and the speculative methods' time breakdown; overall and per task
type (a user prompt's category) and resolution (definitions in the package docstring and :mod:`.stats`)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping

from .methods import BASELINES, OWN_AR
from .stats import median_interval, per_prompt_ratios, relative_spread, total_ratio

__all__ = ["aggregate", "breakdown", "rounded", "run_key", "summarise", "summarise_results", "temperature_key"]

# The result keys of the speedup against each baseline: tau*, tau*_ci, tau*_ci_level, tau*_total.
SPEEDUP_PREFIX = {"ar": "tau", OWN_AR: "tau_own"}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def rounded(x, nd=4):
    """``x`` rounded to ``nd`` digits; ``None`` for missing or non-finite values (JSON has no NaN)."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def temperature_key(t: float) -> str:
    """The key of temperature ``t`` in ``results`` (``"0.0"``, ``"1.0"``)."""
    return str(float(t))


def run_key(run: dict) -> tuple[int, int]:
    """What pairs a method's run with a baseline's: the same prompt (``key``) and the same repeat."""
    return run["key"], run.get("repeat", 0)


def speedup(baseline: Mapping[tuple[int, int], dict], runs: list[dict], prefix: str) -> dict:
    """``{prefix, prefix_ci, prefix_ci_level, prefix_total}`` of ``runs`` against ``baseline`` (run key -> run);
    plus ``prefix_ci_warning`` when there are too few prompts for the interval (:func:`~.stats.median_interval`)."""
    base_t = {k: r["time_s"] for k, r in baseline.items()}
    own_t = {run_key(r): r["time_s"] for r in runs}
    mi = median_interval(per_prompt_ratios(base_t, own_t).values())
    out = {
        prefix: rounded(mi.median),
        f"{prefix}_ci": None if mi.low is None else [rounded(mi.low), rounded(mi.high)],
        f"{prefix}_ci_level": rounded(mi.level, 3),
        f"{prefix}_total": rounded(total_ratio(base_t, own_t)),
    }
    if mi.warning and mi.n:
        out[f"{prefix}_ci_warning"] = mi.warning
    return out


def aggregate(runs: list[dict], baselines: Mapping[str, Mapping[tuple[int, int], dict]], greedy: bool) -> dict:
    """Aggregate the runs of one method (all at one temperature); ``baselines[name]`` maps run key -> that
    baseline's run (``"ar"`` required, ``"ar_own"`` when it ran). Runs without an AR partner are left out."""
    ar = baselines["ar"]
    ok = [r for r in runs if "error" not in r and run_key(r) in ar]
    if not ok:
        return {"n": 0, "tau": None, "sigma": None, "tokens_per_s": None, "ttft_ms": None, "identical": None}
    t = sum(r["time_s"] for r in ok)
    new = sum(r["new_tokens"] for r in ok)
    fw = sum(r["target_forwards"] for r in ok)
    ttft = _mean([r.get("ttft_s") for r in ok])
    times_per_prompt: dict[int, list[float]] = defaultdict(list)
    for r in ok:
        times_per_prompt[r["key"]].append(r["time_s"])
    out: dict = {"n": len(times_per_prompt), "n_runs": len(ok)}
    for name in BASELINES:
        if baselines.get(name):
            out.update(speedup(baselines[name], ok, SPEEDUP_PREFIX[name]))
    out.update(
        sigma=rounded(new / fw if fw else None),
        tokens_per_s=rounded(new / t if t > 0 else None, 2),
        ttft_ms=rounded(None if ttft is None else 1000 * ttft, 2),
        identical=rounded(sum(r["tokens"] == ar[run_key(r)]["tokens"] for r in ok) / len(ok)) if greedy else None,
        time_spread=rounded(relative_spread(times_per_prompt), 3),
        drafter_visual_tokens=rounded(_mean([r.get("drafter_visual_tokens") for r in ok]), 2),
        target_visual_tokens=rounded(_mean([r.get("target_visual_tokens") for r in ok]), 2),
        draft_kv=rounded(_mean([r.get("draft_kv") for r in ok]), 2),
        draft_kv_bytes=rounded(_mean([r.get("draft_kv_bytes") for r in ok]), 1),
        new_tokens_mean=rounded(new / len(ok), 2),
        time_s=rounded(t, 4),
    )
    if any("verify_rounds" in r for r in ok):
        vr = sum(r["verify_rounds"] for r in ok)
        out["accept_length"] = rounded((new - len(ok)) / vr if vr else None)
        out["breakdown"] = breakdown(ok, baselines, vr)
    return out


def _step_ms(baseline_runs: list[dict]) -> float | None:
    """A baseline's ms per token after its first (its decode time over its decode steps)."""
    decode_s = sum(a["time_s"] - (a.get("ttft_s") or 0.0) for a in baseline_runs)
    steps = sum(max(a["new_tokens"] - 1, 0) for a in baseline_runs)
    return rounded(1000 * decode_s / steps, 2) if steps else None


def breakdown(runs: list[dict], baselines: Mapping[str, Mapping[tuple[int, int], dict]], rounds: int) -> dict:
    """Where a speculative method's time goes, next to what one AR decoding step costs.

    Per request: prefill (image + target prefill + first token). Per verification round: draft (tree
    drafting + draft-cache extension), verify (target tree forward + acceptance + KV compaction) and
    other (bookkeeping); ``pipeline`` is the share spent outside the decoder. ``ar_step_ms`` is the HF AR
    baseline's time per token after its first, on the same prompts and repeats (``ar_own_step_ms`` the same for
    the own AR loop, when it ran): a round pays off when it emits more tokens than ``round_ms / ar_step_ms``.
    """
    per = lambda key, n: rounded(1000 * sum(r[key] for r in runs) / n, 2) if n else None  # noqa: E731
    total = sum(r["time_s"] for r in runs)
    parts = {
        "prefill": sum(r["ttft_s"] for r in runs),
        "draft": sum(r["time_draft_s"] for r in runs),
        "verify": sum(r["time_verify_s"] for r in runs),
        "other": sum(r["time_other_s"] for r in runs),
    }
    # The pipeline's own work around the decoder (image preprocessing, tokenisation, result assembly).
    parts["pipeline"] = max(0.0, total - sum(parts.values()))
    own = baselines.get(OWN_AR) or {}
    return {
        "rounds": rounds,
        "prefill_ms_per_request": per("ttft_s", len(runs)),
        "draft_ms_per_round": per("time_draft_s", rounds),
        "verify_ms_per_round": per("time_verify_s", rounds),
        "other_ms_per_round": per("time_other_s", rounds),
        "round_ms": rounded(1000 * (parts["draft"] + parts["verify"] + parts["other"]) / rounds, 2) if rounds else None,
        "tree_nodes_per_round": rounded(sum(r["tree_nodes"] for r in runs) / rounds, 2) if rounds else None,
        "tree_depth_per_round": rounded(sum(r["tree_depth"] for r in runs) / rounds, 2) if rounds else None,
        "ar_step_ms": _step_ms([baselines["ar"][run_key(r)] for r in runs]),
        "ar_own_step_ms": _step_ms([own[run_key(r)] for r in runs if run_key(r) in own]),
        "share": {k: rounded(v / total, 3) if total > 0 else None for k, v in parts.items()},
    }


def summarise(method_runs: list[dict], baselines: Mapping[str, Mapping[tuple[int, int], dict]], greedy: bool) -> dict:
    """:func:`aggregate` of all the runs, plus every one of its metrics per task type (a user prompt's category,
    :func:`~.samples.task_of`) and per resolution, plus the errors of failed runs."""
    agg = aggregate(method_runs, baselines, greedy)
    for key, field_name in (("per_task", "task"), ("per_resolution", "resolution")):
        groups: dict[str, list] = defaultdict(list)
        for r in method_runs:
            groups[str(r[field_name])].append(r)
        agg[key] = {
            g: aggregate(rs, baselines, greedy) for g, rs in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[0]))
        }
    errors = [r["error"] for r in method_runs if "error" in r]
    if errors:
        agg["errors"] = sorted(set(errors))[:5]
        agg["n_errors"] = len(errors)
    return agg


def summarise_results(
    methods, temperatures, runs: list[dict], skipped: dict[str, str], skipped_t: dict[tuple[str, str], str]
) -> dict[str, dict]:
    """``results[method][temperature key]``: a method's :func:`summarise`, or ``{"skipped": why}`` for a method
    that could not run at all (``skipped``) or failed its warm-up at that temperature (``skipped_t``)."""
    results: dict[str, dict] = {}
    for m in methods:
        results[m] = {}
        for t in temperatures:
            tk = temperature_key(t)
            if m in skipped:
                results[m][tk] = {"skipped": skipped[m]}
                continue
            if (m, tk) in skipped_t:
                results[m][tk] = {"skipped": skipped_t[(m, tk)]}
                continue
            baselines = {
                b: {run_key(r): r for r in runs if r["method"] == b and r["temperature"] == t and "error" not in r}
                for b in BASELINES
            }
            mr = [r for r in runs if r["method"] == m and r["temperature"] == t]
            results[m][tk] = summarise(mr, baselines, greedy=(t == 0.0))
    return results
