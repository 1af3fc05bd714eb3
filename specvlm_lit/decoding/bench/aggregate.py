"""Per-method aggregates of the timed runs: tau, sigma, tokens/s, TTFT, identical-to-AR, per task type and
resolution, and the speculative methods' time breakdown (definitions in the package docstring)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

__all__ = ["aggregate", "breakdown", "rounded", "summarise", "summarise_results", "temperature_key"]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def rounded(x, nd=4):
    """``x`` rounded to ``nd`` digits; ``None`` for missing or non-finite values (JSON has no NaN)."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def temperature_key(t: float) -> str:
    """The key of temperature ``t`` in ``results`` (``"0.0"``, ``"1.0"``)."""
    return str(float(t))


def aggregate(runs: list[dict], ar: dict, greedy: bool) -> dict:
    """Aggregate the runs of one method (all at one temperature); ``ar`` maps sample key -> AR run."""
    ok = [r for r in runs if "error" not in r and r["key"] in ar]
    if not ok:
        return {"n": 0, "tau": None, "sigma": None, "tokens_per_s": None, "ttft_ms": None, "identical": None}
    t = sum(r["time_s"] for r in ok)
    t_ar = sum(ar[r["key"]]["time_s"] for r in ok)
    new = sum(r["new_tokens"] for r in ok)
    fw = sum(r["target_forwards"] for r in ok)
    ttft = _mean([r.get("ttft_s") for r in ok])
    out = {
        "n": len(ok),
        "tau": rounded(t_ar / t if t > 0 else None),
        "sigma": rounded(new / fw if fw else None),
        "tokens_per_s": rounded(new / t if t > 0 else None, 2),
        "ttft_ms": rounded(None if ttft is None else 1000 * ttft, 2),
        "identical": rounded(sum(r["tokens"] == ar[r["key"]]["tokens"] for r in ok) / len(ok)) if greedy else None,
        "drafter_visual_tokens": rounded(_mean([r.get("drafter_visual_tokens") for r in ok]), 2),
        "target_visual_tokens": rounded(_mean([r.get("target_visual_tokens") for r in ok]), 2),
        "draft_kv": rounded(_mean([r.get("draft_kv") for r in ok]), 2),
        "draft_kv_bytes": rounded(_mean([r.get("draft_kv_bytes") for r in ok]), 1),
        "new_tokens_mean": rounded(new / len(ok), 2),
        "time_s": rounded(t, 4),
    }
    if any("verify_rounds" in r for r in ok):
        vr = sum(r["verify_rounds"] for r in ok)
        out["accept_length"] = rounded((new - len(ok)) / vr if vr else None)
        out["breakdown"] = breakdown(ok, ar, vr)
    return out


def breakdown(runs: list[dict], ar: dict, rounds: int) -> dict:
    """Where a speculative method's time goes, next to what one AR decoding step costs.

    Per request: prefill (image + target prefill + first token). Per verification round: draft (tree
    drafting + draft-cache extension), verify (target tree forward + acceptance + KV compaction) and
    other (bookkeeping); ``pipeline`` is the share spent outside the decoder. ``ar_step_ms`` is the AR
    baseline's time per token after its first, on the same prompts: a round pays off when it emits more tokens
    than ``round_ms / ar_step_ms``.
    """
    per = lambda key, n: rounded(1000 * sum(r[key] for r in runs) / n, 2) if n else None  # noqa: E731
    ar_runs = [ar[r["key"]] for r in runs]
    ar_decode_s = sum(a["time_s"] - (a.get("ttft_s") or 0.0) for a in ar_runs)
    ar_steps = sum(max(a["new_tokens"] - 1, 0) for a in ar_runs)
    total = sum(r["time_s"] for r in runs)
    parts = {
        "prefill": sum(r["ttft_s"] for r in runs),
        "draft": sum(r["time_draft_s"] for r in runs),
        "verify": sum(r["time_verify_s"] for r in runs),
        "other": sum(r["time_other_s"] for r in runs),
    }
    # The pipeline's own work around the decoder (image preprocessing, tokenisation, result assembly).
    parts["pipeline"] = max(0.0, total - sum(parts.values()))
    return {
        "rounds": rounds,
        "prefill_ms_per_request": per("ttft_s", len(runs)),
        "draft_ms_per_round": per("time_draft_s", rounds),
        "verify_ms_per_round": per("time_verify_s", rounds),
        "other_ms_per_round": per("time_other_s", rounds),
        "round_ms": rounded(1000 * (parts["draft"] + parts["verify"] + parts["other"]) / rounds, 2) if rounds else None,
        "tree_nodes_per_round": rounded(sum(r["tree_nodes"] for r in runs) / rounds, 2) if rounds else None,
        "tree_depth_per_round": rounded(sum(r["tree_depth"] for r in runs) / rounds, 2) if rounds else None,
        "ar_step_ms": rounded(1000 * ar_decode_s / ar_steps, 2) if ar_steps else None,
        "share": {k: rounded(v / total, 3) if total > 0 else None for k, v in parts.items()},
    }


def summarise(method_runs: list[dict], ar: dict, greedy: bool) -> dict:
    agg = aggregate(method_runs, ar, greedy)
    for key, field_name in (("per_task", "task"), ("per_resolution", "resolution")):
        groups: dict[str, list] = defaultdict(list)
        for r in method_runs:
            groups[str(r[field_name])].append(r)
        agg[key] = {
            g: {
                k: v
                for k, v in aggregate(rs, ar, greedy).items()
                if k
                in ("n", "tau", "sigma", "tokens_per_s", "ttft_ms", "identical", "drafter_visual_tokens", "draft_kv")
            }
            for g, rs in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[0]))
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
            ar = {r["key"]: r for r in runs if r["method"] == "ar" and r["temperature"] == t and "error" not in r}
            mr = [r for r in runs if r["method"] == m and r["temperature"] == t]
            results[m][tk] = summarise(mr, ar, greedy=(t == 0.0))
    return results
