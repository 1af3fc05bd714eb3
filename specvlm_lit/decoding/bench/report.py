"""The benchmark's outputs: the ``bench.json`` report (results, load, warnings, samples, every run, notes),
``bench.md`` and ``bench.png``."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from .aggregate import SPEEDUP_PREFIX, rounded, temperature_key
from .methods import LABELS, OWN_AR
from .stats import CI_LEVEL

__all__ = ["build_report", "report_warnings", "write_markdown", "write_plot", "write_report"]


def _notes(s, runner, runs: list[dict], samples, prepared, source_notes) -> list[str]:
    """What a reader of the results must know about how this run went (where the prompts came from, workarounds,
    fallbacks, image sizes)."""
    import transformers

    notes = list(source_notes) + list(runner.notes)
    if "prompt_lookup" in s.methods and s.prompt_lookup_suppress_image_token:
        notes.append(
            "HF prompt lookup runs with suppress_tokens=[image token]: unfiltered, its 1-gram match of "
            "':' (from 'USER:') proposes the image placeholders, and HF's first verification forward "
            "then fails in LLaVA ('Image features and image tokens do not match')"
        )
    if runner.assistant is not None:
        a = runner.assistant
        notes.append(
            f"HF assisted: assistant {a.path} gets its own image features via a forward pre-hook "
            f"(transformers {transformers.__version__} drops mm_encoder_outputs / pixel_values from the "
            f"assistant's prefill); HF assistant defaults {a.generation_defaults}"
        )
        blind = [r for r in runs if r["method"] == "assisted" and r.get("assistant_saw_image") is False]
        if blind:
            notes.append(f"HF assisted: in {len(blind)} run(s) the assistant did not receive image features")
    if any(smp.resized for smp in samples):
        notes.append(
            "some samples were resized to reach samples_per_resolution native-size samples (marked resized in samples)"
        )
    sizes = sorted({(smp.resolution, inp.image_size, inp.n_visual) for smp, inp, _ in prepared})
    notes.append(
        "processed image size / target visual tokens per resolution: "
        + "; ".join(f"{r}px -> {w}x{h} / {n}" for r, (w, h), n in sizes)
    )
    return notes


def report_warnings(load: dict, results: dict) -> list[str]:
    """What makes this run's ratios less trustworthy: the load warnings (:mod:`.load`), then each distinct
    interval warning (too few prompts, :func:`~.stats.median_interval`)."""
    warnings = list(load["warnings"])
    for per_t in results.values():
        for r in per_t.values():
            for prefix in SPEEDUP_PREFIX.values():
                w = r.get(f"{prefix}_ci_warning")
                if w and w not in warnings:
                    warnings.append(w)
    return warnings


def build_report(
    s,
    machine: dict,
    load: dict,
    urls: list[str],
    runner,
    results: dict,
    samples,
    prepared,
    runs: list[dict],
    source_notes: list[str] = (),
) -> dict:
    """The ``bench.json`` content; ``load`` is :func:`~.load.load_report`'s block; ``urls`` the test shards read
    (or, with ``bench.prompts``, the prompt file / shards); ``prepared`` holds ``(sample, PreparedPrompt, assistant
    pixels)`` per sample; ``source_notes`` what reading the samples found (:func:`~.runner.benchmark_samples`)."""
    notes = _notes(s, runner, runs, samples, prepared, source_notes)
    config = asdict(s)
    config.update(
        **({"test_urls_resolved": urls} if s.prompts is None else {"prompts_resolved": urls}),
        drafter_paths=runner.drafter_paths,
        assistant_generation_defaults=(runner.assistant.generation_defaults if runner.assistant is not None else None),
    )
    return {
        "machine": machine,
        "load": load,
        "warnings": report_warnings(load, results),
        "config": config,
        "results": results,
        "samples": [
            {
                "id": smp.id,
                "task": smp.task,
                "resolution": smp.resolution,
                "resized": smp.resized,
                "native_size": list(smp.native_size),
                "processed_size": list(inp.image_size),
                "target_visual_tokens": inp.n_visual,
                "prompt_len": inp.prompt_len,
                **({"source": smp.source} if smp.source else {}),
            }
            for smp, inp, _ in prepared
        ],
        "runs": [
            {k: (rounded(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k != "tokens"} for r in runs
        ],
        "notes": notes,
    }


def write_report(report: dict, out_dir: Path) -> None:
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    write_markdown(report, out_dir / "bench.md")
    write_plot(report, out_dir / "bench.png")


def _fmt(v, nd=2, pct=False):
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.0f}%"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _with_ci(r: dict, prefix: str) -> str:
    """``1.32 [1.20, 1.41]``: a speedup and its interval (``-`` when that baseline did not run)."""
    ci = r.get(f"{prefix}_ci")
    return _fmt(r.get(prefix)) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def _load_line(load: dict) -> str:
    fmt = lambda la: "n/a" if la is None else " / ".join(f"{x:.2f}" for x in la)  # noqa: E731
    return (
        f"Load average (1 / 5 / 15 min) before the timed runs {fmt(load['loadavg_before'])}, after "
        f"{fmt(load['loadavg_after'])}, on {load['cores']} cores with {load['torch_threads']} torch threads."
    )


def _metric_header() -> list[str]:
    """The metric columns of every results table (overall and per task type / category), after the method."""
    level = f"{CI_LEVEL:.0%}"
    return [
        f"tau vs HF AR [{level} CI]",
        f"tau vs own AR [{level} CI]",
        "tau_total",
        "sigma",
        "tokens/s",
        "TTFT ms",
        "identical to AR",
        "drafter visual tokens",
        "draft KV rows",
        "time spread",
        "n",
    ]


def _metric_cells(r: dict) -> list[str]:
    """One aggregate (:func:`~.aggregate.aggregate`) as the cells of :func:`_metric_header`."""
    return [
        _with_ci(r, "tau"),
        _with_ci(r, SPEEDUP_PREFIX[OWN_AR]),
        _fmt(r.get("tau_total")),
        _fmt(r.get("sigma")),
        _fmt(r.get("tokens_per_s"), 1),
        _fmt(r.get("ttft_ms"), 1),
        _fmt(r.get("identical"), pct=True),
        _fmt(r.get("drafter_visual_tokens"), 1),
        _fmt(r.get("draft_kv"), 1),
        _fmt(r.get("time_spread"), pct=True),
        str(r.get("n", 0)),
    ]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _what_was_decoded(report: dict) -> str:
    """The sentence that says which prompts the tables are about."""
    cfg = report["config"]
    if cfg.get("prompts") is None:
        tasks = "every task type" if cfg.get("tasks") is None else "task type(s) " + ", ".join(cfg["tasks"])
        return (
            f"{cfg['samples_per_resolution']} held-out samples per resolution at "
            f"{', '.join(str(r) for r in cfg['resolutions'])} px ({tasks})"
        )
    per_category = Counter(smp["task"] for smp in report["samples"])
    counts = ", ".join(f"{c} {n}" for c, n in sorted(per_category.items()))
    return (
        f"{len(report['samples'])} prompt(s) from `{cfg['prompts']}` (per category: {counts}), each image at its own "
        "size"
    )


def _batch_lines(batch: dict) -> list[str]:
    """The batch-throughput table (:mod:`.batch`): one row per batch size."""
    level = f"{CI_LEVEL:.0%}"
    lines = [
        "## Batch throughput (T = 0)",
        "",
        "Groups of B consecutive prompts decoded at once; both methods on the same group, interleaved, "
        f"`bench.repeats` times. Speedup = median over groups of the paired throughput ratio [{level} CI].",
        "",
        "| batch | HF batched tokens/s | SpecVLM batched tokens/s | speedup [CI] | speedup (sums) | SpecVLM sigma | "
        "identical to AR (SpecVLM / HF batched) | groups |",
        "|---" * 8 + "|",
    ]
    notes = []
    for bsz, r in batch.items():
        if "skipped" in r:
            lines.append(f"| {bsz} | skipped: {r['skipped']} |" + " |" * 6)
            continue
        hf, sp = r["hf_batched"], r["spec_batched"]
        ci = r.get("speedup_ci")
        lines.append(
            _row(
                [
                    bsz,
                    _fmt(hf["tokens_per_s"], 1),
                    _fmt(sp["tokens_per_s"], 1),
                    _fmt(r["speedup"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""),
                    _fmt(r["speedup_total"]),
                    _fmt(sp.get("sigma")),
                    f"{_fmt(sp['identical'], pct=True)} / {_fmt(hf['identical'], pct=True)}",
                    str(r["groups"]),
                ]
            )
        )
        if r.get("speedup_ci_warning"):
            notes.append(f"batch {bsz}: {r['speedup_ci_warning']}")
    lines.append("")
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    return lines


def write_markdown(report: dict, path: Path) -> None:
    m, cfg, load = report["machine"], report["config"], report["load"]
    lines = ["# SpecVLM decoding benchmark", ""]
    if report["warnings"]:
        lines += ["**Warning:** the ratios below may not hold on another run:", ""]
        lines += [f"- {w}" for w in report["warnings"]] + [""]
    lines += [
        f"Machine: {m['cpu'] or m['machine']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads), "
        f"{m['platform']}, torch {m['torch']}, transformers {m['transformers']}, device {m['device']}, "
        f"dtype {m['dtype']}. {m['note']}.",
        "",
        _load_line(load),
        "",
        f"Target `{cfg['target']}`; {_what_was_decoded(report)}; max_new_tokens {cfg['max_new_tokens']}; "
        f"{cfg['repeats']} interleaved repeat(s) per prompt and method; tree {cfg['tree']}.",
        "",
    ]
    methods = list(report["results"])
    level = f"{CI_LEVEL:.0%}"
    header = _metric_header()
    group = "task type" if cfg.get("prompts") is None else "category"
    for t in cfg["temperatures"]:
        tk = temperature_key(t)
        lines += [f"## T = {t:g}", "", _row(["method", *header]), "|---" * (len(header) + 1) + "|"]
        for meth in methods:
            r = report["results"][meth].get(tk, {})
            if "skipped" in r:
                lines.append(f"| {LABELS[meth]} | skipped: {r['skipped']} |" + " |" * (len(header) - 1))
                continue
            lines.append(_row([LABELS[meth], *_metric_cells(r)]))
        grouped = [(meth, report["results"][meth].get(tk, {}).get("per_task") or {}) for meth in methods]
        if any(per for _, per in grouped):
            lines += ["", f"Per {group} at T = {t:g}:", "", _row(["method", group, *header])]
            lines.append("|---" * (len(header) + 2) + "|")
            for meth, per in grouped:
                for name, r in per.items():
                    lines.append(_row([LABELS[meth], name, *_metric_cells(r)]))
        spec = [(meth, report["results"][meth].get(tk, {}).get("breakdown")) for meth in methods]
        spec = [(meth, b) for meth, b in spec if b]
        if spec:
            lines += [
                "",
                f"Where the time goes at T = {t:g} (ms; shares of the method's total wall time):",
                "",
                "| method | prefill / request | draft / round | verify / round | other / round | round | "
                "tree nodes / round | tree depth / round | AR step (HF) | AR step (own) | prefill % | draft % | "
                "verify % | other % | pipeline % |",
                "|---" * 15 + "|",
            ]
            for meth, b in spec:
                sh = b["share"]
                lines.append(
                    f"| {LABELS[meth]} | {_fmt(b['prefill_ms_per_request'], 1)} | "
                    f"{_fmt(b['draft_ms_per_round'], 1)} | {_fmt(b['verify_ms_per_round'], 1)} | "
                    f"{_fmt(b['other_ms_per_round'], 1)} | {_fmt(b['round_ms'], 1)} | "
                    f"{_fmt(b['tree_nodes_per_round'], 1)} | {_fmt(b['tree_depth_per_round'], 1)} | "
                    f"{_fmt(b['ar_step_ms'], 1)} | {_fmt(b.get('ar_own_step_ms'), 1)} | "
                    + " | ".join(_fmt(sh[k], pct=True) for k in ("prefill", "draft", "verify", "other", "pipeline"))
                    + " |"
                )
        lines.append("")
    if report.get("batch"):
        lines += _batch_lines(report["batch"]["results"])
    lines += [
        "## Definitions",
        "",
        "- paired ratio = AR wall time / the method's wall time for the same prompt and repeat (methods interleaved "
        "in a rotating order; image encoding included everywhere); per-prompt ratio = median over the repeats.",
        f"- tau = median of the per-prompt ratios; [{level} CI] = distribution-free order-statistic interval for "
        "that median. 'vs HF AR' pairs with HF generate(), 'vs own AR' with this project's AR loop (same kernels "
        "as the speculative decoder: the gain from speculation alone).",
        "- tau_total = sum of HF AR wall times / sum of the method's wall times over the same runs (the earlier "
        "reports' tau).",
        "- sigma = new tokens / target forwards that produced them (speculative: prefill + verifications).",
        "- TTFT: HF methods = a max_new_tokens=1 call on the same input; own AR and speculative = their prefill.",
        "- identical = fraction of greedy outputs token-identical to the HF AR output (T = 0 only).",
        "- time spread = median over prompts of (max - min) / median of the method's times across repeats.",
        "",
    ]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = report["config"]["temperatures"]
    methods = list(report["results"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(temps), 1)
    for ax, key, title in (
        (axes[0], "tau", f"speedup tau vs HF AR: median of paired ratios, {CI_LEVEL:.0%} CI"),
        (axes[1], "sigma", "sigma: tokens per target forward"),
    ):
        for i, t in enumerate(temps):
            xs, ys, errs = [], [], [[], []]
            for j, m in enumerate(methods):
                r = report["results"][m].get(temperature_key(t), {})
                x = j + (i - (len(temps) - 1) / 2) * width
                v = r.get(key)
                if v is None:
                    ax.text(
                        x,
                        0.02,
                        "skipped" if "skipped" in r else "n/a",
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="grey",
                    )
                    continue
                xs.append(x)
                ys.append(v)
                ci = r.get(f"{key}_ci") or [v, v]  # sigma has no interval: it does not depend on timing
                errs[0].append(max(0.0, v - ci[0]))
                errs[1].append(max(0.0, ci[1] - v))
            bars = ax.bar(xs, ys, width=width, label=f"T = {t:g}", yerr=errs, capsize=2, error_kw={"lw": 0.8})
            for b_, y in zip(bars, ys):
                ax.text(b_.get_x() + b_.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([LABELS[m] for m in methods], rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    m = report["machine"]
    busy = " - BUSY MACHINE, see bench.md" if report["load"]["busy"] else ""
    fig.suptitle(
        f"{m['cpu'] or m['machine']}, {m['torch_threads']} threads, {m['device']} {m['dtype']}{busy}", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
