"""The benchmark's batch rows: throughput of several requests decoded at once (``bench.batch_sizes``, T = 0).

For each batch size ``B`` the prompts are cut into consecutive groups of ``B`` (a last, incomplete group is left
out). Per group and repeat, two methods decode the *same* group right after each other, in an order that rotates
like the per-prompt rounds (:mod:`.schedule`):

* ``hf_batched``: Hugging Face ``generate()`` on the left-padded group (one ``attention_mask``, the images as the
  target family hands them to HF: ``TargetAdapter.hf_generate_inputs``), each row cut after its first EOS;
* ``spec_batched``: :class:`~specvlm_lit.decoding.batched.BatchedSpeculativeDecoder` with the SpecVLM drafter
  (EagleVLM when only that one ran) and the static tree.

Image encoding is inside both timed regions. Throughput = new tokens of the group / wall time. The speedup is the
median over groups of the paired throughput ratio (SpecVLM / HF, same group and repeat; the median over repeats
per group), with the 95% interval of :mod:`.stats` (which needs >= 6 groups). ``identical`` compares every row
with that prompt's output of plain HF ``generate()`` alone (the ``ar`` runs at T = 0).
"""

from __future__ import annotations

import time
from typing import Any

from .aggregate import rounded, run_key
from .schedule import order_for_round
from .stats import median_interval, per_prompt_ratios, total_ratio

__all__ = ["BATCH_METHODS", "summarise_batches", "time_batches"]

BATCH_METHODS = ("hf_batched", "spec_batched")
BATCH_LABELS = {"hf_batched": "HF generate(), batched", "spec_batched": "SpecVLM, batched"}


def _cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


def run_hf_batched(pipe, group: list, max_new_tokens: int) -> tuple[list[list[int]], float]:
    """HF ``generate()`` on a left-padded group of prepared prompts -> (tokens per row, wall seconds)."""
    import torch

    from ...data.shards import batch_visuals

    ad = pipe.adapter
    for inp in group:
        pipe.check_fits(inp, max_new_tokens)
    width = max(inp.prompt_len for inp in group)
    pad = pipe.pad_token_id
    ids = torch.full((len(group), width), pad, dtype=torch.long)
    mask = torch.zeros(len(group), width, dtype=torch.long)
    for b, inp in enumerate(group):
        ids[b, width - inp.prompt_len :] = inp.input_ids[0]
        mask[b, width - inp.prompt_len :] = 1
    ids, mask = ids.to(ad.device), mask.to(ad.device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        # The family owns what HF generate() needs (Qwen-VL: processor outputs + mm_token_type_ids for mRoPE).
        visual = batch_visuals([inp.pixel_values for inp in group])
        out = ad.model.generate(
            input_ids=ids,
            attention_mask=mask,
            **ad.hf_generate_inputs(ids, visual),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=pipe.eos_token_id,
            pad_token_id=pad,
        )
        if ad.device.type == "cuda":
            torch.cuda.synchronize(ad.device)
        elapsed = time.perf_counter() - t0
    return [_cut_at_eos(row[width:].tolist(), pipe.eos_token_id) for row in out], elapsed


def run_spec_batched(decoder, pipe, group: list, max_new_tokens: int) -> tuple[list[list[int]], float, Any]:
    """The batched speculative decoder on a group -> (tokens per row, wall seconds, its stats)."""
    for inp in group:
        pipe.check_fits(inp, max_new_tokens)
    t0 = time.perf_counter()
    res = decoder.generate(
        [inp.input_ids for inp in group],
        pixel_values=[inp.pixel_values for inp in group],
        max_new_tokens=max_new_tokens,
        eos_token_id=pipe.eos_token_id,
        image_layouts=[inp.layouts for inp in group],
    )
    return [t.tolist() for t in res.tokens], time.perf_counter() - t0, res.stats


def batch_decoder(runner):
    """``(decoder, drafter row used)`` for the batch rows, or ``(None, why not)``."""
    from ..batched import BatchedSpeculativeDecoder
    from ..pipeline import _tree_config

    for row in ("specvlm", "eaglevlm"):
        pipe = runner.pipes.get(row)
        if pipe is not None:
            tree = _tree_config({**runner.s.tree, "adaptive": False})
            return BatchedSpeculativeDecoder(runner.adapter, pipe.drafter, tree), row
    return None, "no SpecVLM or EagleVLM drafter ran in this benchmark (the batch rows need one)"


def time_batches(runner, s, prepared: list, ar_tokens: dict[int, list[int]], bar=None) -> tuple[list[dict], dict]:
    """Warm-up and ``s.repeats`` interleaved rounds of both batch methods per group, per batch size (module doc).
    Returns the run records and ``{batch size: why it was skipped}``."""
    decoder, which = batch_decoder(runner)
    skipped: dict[int, str] = {}
    runs: list[dict] = []
    if decoder is None:
        return runs, {b: which for b in s.batch_sizes}
    pipe = runner.base
    inputs = [inp for _, inp, _ in prepared]
    for bsz in s.batch_sizes:
        groups = [inputs[i : i + bsz] for i in range(0, len(inputs) - bsz + 1, bsz)]
        if not groups:
            skipped[bsz] = f"batch size {bsz} needs at least {bsz} prompts, the benchmark has {len(inputs)}"
            continue
        for _ in range(s.warmup):
            run_hf_batched(pipe, groups[0], s.max_new_tokens)
            run_spec_batched(decoder, pipe, groups[0], s.max_new_tokens)
        for g, group in enumerate(groups):
            for rep in range(s.repeats):
                for pos, m in enumerate(order_for_round(list(BATCH_METHODS), g * s.repeats + rep)):
                    if m == "hf_batched":
                        tokens, elapsed = run_hf_batched(pipe, group, s.max_new_tokens)
                        extra = {}
                    else:
                        tokens, elapsed, st = run_spec_batched(decoder, pipe, group, s.max_new_tokens)
                        extra = {"rounds": st.rounds, "sigma": st.sigma, "drafter": which}
                    ref = [ar_tokens.get(g * bsz + j) for j in range(len(group))]
                    runs.append(
                        {
                            "method": m,
                            "batch_size": bsz,
                            "key": g,
                            "repeat": rep,
                            "position": pos,
                            "time_s": elapsed,
                            "new_tokens": sum(len(t) for t in tokens),
                            "identical": None if None in ref else sum(t == r for t, r in zip(tokens, ref)) / len(ref),
                            **extra,
                        }
                    )
                    if bar is not None:
                        bar.update(1)
    return runs, skipped


def summarise_batches(batch_sizes, runs: list[dict], skipped: dict[int, str]) -> dict[str, dict]:
    """``results[str(B)]``: tokens/s of both methods, the paired throughput ratio (median, 95% interval, ratio of
    sums), sigma and identical-to-AR per method; or ``{"skipped": why}``."""
    out: dict[str, dict] = {}
    for bsz in batch_sizes:
        if bsz in skipped:
            out[str(bsz)] = {"skipped": skipped[bsz]}
            continue
        per = {m: [r for r in runs if r["batch_size"] == bsz and r["method"] == m] for m in BATCH_METHODS}
        # Seconds per token: the ratio base / method of these is the throughput ratio method / base.
        spt = {m: {run_key(r): r["time_s"] / max(r["new_tokens"], 1) for r in rs} for m, rs in per.items()}
        mi = median_interval(per_prompt_ratios(spt["hf_batched"], spt["spec_batched"]).values())
        row: dict[str, Any] = {
            "groups": mi.n,
            "speedup": rounded(mi.median),
            "speedup_ci": None if mi.low is None else [rounded(mi.low), rounded(mi.high)],
            "speedup_ci_level": rounded(mi.level, 3),
            "speedup_total": rounded(total_ratio(spt["hf_batched"], spt["spec_batched"])),
        }
        if mi.warning and mi.n:
            row["speedup_ci_warning"] = (
                f"{mi.n} group(s) of {bsz} prompts are too few for a 95% interval (6 needed): the interval given is "
                f"[min, max], covering the median with probability {mi.level:.0%} only; benchmark more prompts"
            )
        for m, rs in per.items():
            t = sum(r["time_s"] for r in rs)
            ident = [r["identical"] for r in rs if r["identical"] is not None]
            row[m] = {
                "tokens_per_s": rounded(sum(r["new_tokens"] for r in rs) / t if t > 0 else None, 2),
                "identical": rounded(sum(ident) / len(ident)) if ident else None,
                "n_runs": len(rs),
            }
            sig = [x for r in rs for x in r.get("sigma", [])]
            if sig:
                row[m]["sigma"] = rounded(sum(sig) / len(sig))
        out[str(bsz)] = row
    return out
