"""Where a speculative round's time goes: wall-clock phases per round and torch.profiler's per-op table.

    python scripts/profile_round.py                                   # embedded target, newest drafter (or random)
    python scripts/profile_round.py --drafter outputs/train/runs/<run>/drafter --prompts 4 --threads 2
    python scripts/profile_round.py --target tiny --max-new-tokens 24 # a random tiny LLaVA, seconds
    python scripts/profile_round.py --batch 4                         # the batched decoder (decoding/batched.py)

Three passes over the same prompts: a warm-up, a timed pass without the profiler (the phase table: SpecStats'
draft / verify / other per verification round, next to one step of this project's AR loop), and a profiled pass.
The profiled pass wraps the decoder's pieces in ``record_function`` ranges from the outside (drafter forward per
tree level, draft log-probs, tree builder, target verification forward, acceptance, KV compaction, draft-cache
extension), so the decoder itself carries no profiling code; its table lists each range and the top ops by self
CPU time. Profiling adds a few microseconds per op, so read absolute times from the timed pass.

With no ``--drafter`` the newest exported drafter for the target under ``outputs/`` is used; failing that, a
freshly initialised SpecVLM drafter (random weights: almost nothing is accepted, but every round still drafts the
whole tree, so the per-call costs are the real ones).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from specvlm_lit import kv_cache  # noqa: E402
from specvlm_lit.decoding import speculative, tree  # noqa: E402
from specvlm_lit.decoding.acceptance import WarpConfig  # noqa: E402
from specvlm_lit.decoding.autoregressive import AutoregressiveDecoder  # noqa: E402
from specvlm_lit.decoding.speculative import SpeculativeDecoder, TreeConfig  # noqa: E402


def _tiny_target():
    """The tests' tiny random LLaVA (2 layers of width 64, LLaVA-1.5-shaped), for a quick run of the script."""
    from transformers import LlavaForConditionalGeneration

    from specvlm_lit.target import TargetAdapter
    from tests.test_target_adapter import tiny_llava_config

    torch.manual_seed(0)
    return TargetAdapter(LlavaForConditionalGeneration(tiny_llava_config()).eval())


def _tiny_prompts(adapter, n: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        text = torch.randint(0, adapter.image_token_id, (6 + i,), generator=g).tolist()
        ids = text[:3] + [adapter.image_token_id] * adapter.num_visual_tokens(32, 32) + text[3:]
        out.append((torch.tensor([ids]), torch.randn(1, 3, 32, 32, generator=g), None, None))
    return out


def _embedded_prompts(pipe, n: int, max_new_tokens: int):
    """The benchmark's first held-out samples (64 and 128 px alternating), prepared by the pipeline."""
    from specvlm_lit.decoding.bench.samples import collect_samples, expand_urls

    urls = expand_urls([str(REPO / "data/synthetic/test-*.tar")])
    if not urls:
        from specvlm_lit.synthetic.generate import CorpusSpec, ensure_corpus

        ensure_corpus(str(REPO / "data/synthetic"), CorpusSpec(), log=lambda *_: None)
        urls = expand_urls([str(REPO / "data/synthetic/test-*.tar")])
    samples = collect_samples(urls, [64, 128], (n + 1) // 2)
    samples = [s for pair in zip(samples[: (n + 1) // 2], samples[(n + 1) // 2 :]) for s in pair][:n]
    out = []
    for s in samples:
        p = pipe.prepare(s.image, s.question, max_new_tokens=max_new_tokens)
        out.append((p.input_ids, p.pixel_values, p.layouts, s.question))
    return out


def _load(args):
    """``(adapter, drafter, prompts, eos, what)``."""
    from specvlm_lit.drafter.eagle import EagleVLMDrafter

    if args.target == "tiny":
        adapter = _tiny_target()
        drafter = EagleVLMDrafter.for_target(adapter).eval()
        return adapter, drafter, _tiny_prompts(adapter, args.prompts), None, "tiny random LLaVA, random drafter"
    from specvlm_lit.decoding.pipeline import SpecVLMPipeline, find_exported_drafters, pick_drafter

    pipe = SpecVLMPipeline(args.target, None, dtype=args.dtype, device=args.device)
    path = args.drafter
    if path is None:
        path = pick_drafter(find_exported_drafters(REPO / "outputs", "specvlm"), pipe.adapter.fingerprint())
    if path is None:
        drafter = EagleVLMDrafter.for_target(pipe.adapter, compressor={"type": "select"})
        drafter = drafter.to(device=args.device, dtype=pipe.adapter.dtype).eval()
        what = "random-weight SpecVLM drafter (no export found under outputs/)"
    else:
        drafter = EagleVLMDrafter.load(path, target=pipe.adapter, dtype=pipe.adapter.dtype, device=args.device)
        what = f"drafter {path}"
    return pipe.adapter, drafter, _embedded_prompts(pipe, args.prompts, args.max_new_tokens), pipe.eos_token_id, what


# ------------------------------------------------------------------------------------------ profiled ranges
def _ranged(obj, name: str, label: str | None = None, label_fn=None):
    """Replace ``obj.name`` by a wrapper that runs it inside ``record_function(label)``; returns an undo."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapper(*a, **k):
        with torch.profiler.record_function(label_fn() if label_fn else label):
            return original(*a, **k)

    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, original)


def _install_ranges(dec) -> list:
    """record_function ranges around every piece of a round (see the module doc)."""
    state = {"in_tree": False}

    def tree_wrapper(original):
        @functools.wraps(original)
        def run(*a, **k):
            state["in_tree"] = True
            try:
                with torch.profiler.record_function("round: draft tree"):
                    return original(*a, **k)
            finally:
                state["in_tree"] = False

        return run

    undo = []
    for name in ("_draft_tree", "_draft_trees"):  # batch 1 / batched
        if hasattr(dec, name):
            setattr(dec, name, tree_wrapper(getattr(dec, name)))
            undo.append(lambda name=name: delattr(dec, name))
    undo.append(
        _ranged(
            dec,
            "_draft",
            label_fn=lambda: "draft: drafter forward (level)" if state["in_tree"] else "extend: drafter forward",
        )
    )
    undo.append(_ranged(dec, "_logprobs", "draft: log-probs (lm_head + log_softmax)"))
    builder = tree.BatchedTreeBuilder if hasattr(dec, "_draft_trees") else tree.TreeBuilder
    for name in ("start", "expand", "build"):
        undo.append(_ranged(builder, name, f"draft: {builder.__name__}.{name}"))
    undo.append(_ranged(dec.adapter, "tree_forward", "verify: target tree forward"))
    undo.append(_ranged(dec.adapter, "forward", "target forward (prefill / batched verify)"))
    for mod in (speculative,) + (
        (sys.modules.get("specvlm_lit.decoding.batched"),) if "specvlm_lit.decoding.batched" in sys.modules else ()
    ):
        for name in ("accept_greedy", "accept_sampling", "greedy_paths"):
            if hasattr(mod, name):
                undo.append(_ranged(mod, name, "verify: acceptance"))
    undo.append(_ranged(kv_cache, "compact", "verify: KV compaction"))
    undo.append(_ranged(kv_cache, "compact_rows", "KV compaction (batched rows)"))
    return undo


def _decode_all(dec, prompts, args, eos, batch: int):
    """Decode every prompt (batch 1) or the prompts in groups of ``batch``; returns the stats objects."""
    out = []
    if batch == 1:
        for ids, px, layouts, _ in prompts:
            g = torch.Generator().manual_seed(0)
            res = dec.generate(
                ids,
                pixel_values=px,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=eos,
                generator=g,
                **({"image_layouts": layouts} if layouts is not None else {}),
            )
            out.append(res.stats)
        return out
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        res = dec.generate(
            [ids for ids, *_ in group],
            pixel_values=[px for _, px, *_ in group],
            max_new_tokens=args.max_new_tokens,
            eos_token_id=eos,
            image_layouts=[layouts for _, _, layouts, _ in group],
        )
        out.append(res.stats)
    return out


def _phase_table(stats, ar_step_ms: float) -> list[str]:
    rounds = sum(s.verify_rounds for s in stats)
    new = sum(s.new_tokens for s in stats)
    per = lambda x: 1000 * x / rounds if rounds else float("nan")  # noqa: E731
    draft, verify, other = (sum(getattr(s, f"time_{k}") for s in stats) for k in ("draft", "verify", "other"))
    prefill, total = sum(s.time_prefill for s in stats), sum(s.time_total for s in stats)
    nodes = sum(sum(s.tree_sizes) for s in stats) / rounds if rounds else float("nan")
    rnd = per(draft + verify + other)
    return [
        "| phase | ms / round | share of decode |",
        "|---|---|---|",
        f"| draft (tree levels + draft-cache extension) | {per(draft):.2f} | {draft / (total - prefill):.0%} |",
        f"| verify (tree forward + acceptance + KV compaction) | {per(verify):.2f} | "
        f"{verify / (total - prefill):.0%} |",
        f"| other (bookkeeping) | {per(other):.2f} | {other / (total - prefill):.0%} |",
        f"| **round** | **{rnd:.2f}** | |",
        "",
        f"rounds {rounds}, new tokens {new}, sigma {new / (rounds + len(stats)):.2f} (prefill counted), tree nodes / "
        f"round {nodes:.1f}, prefill {1000 * prefill / len(stats):.1f} ms / request; own-AR step {ar_step_ms:.2f} ms "
        f"-> a round costs {rnd / ar_step_ms:.2f} AR steps",
    ]


def _ar_step_ms(adapter, prompts, args, eos) -> float:
    dec = AutoregressiveDecoder(adapter, WarpConfig(temperature=args.temperature))
    steps = t = 0.0
    for ids, px, _, _ in prompts:
        res = dec.generate(ids, pixel_values=px, max_new_tokens=args.max_new_tokens, eos_token_id=eos)
        steps += max(res.stats.new_tokens - 1, 0)
        t += res.stats.time_verify
    return 1000 * t / steps if steps else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=str(REPO / "data/embedded_target"), help="target dir, or 'tiny'")
    ap.add_argument("--drafter", default=None, help="exported drafter dir (default: newest for the target)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--tree", default="10,7,60", help="top_k,depth,total_tokens")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help=">1: the batched decoder on groups of prompts")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=25, help="ops listed in the profiler table")
    ap.add_argument("--json", default=None, help="also write the phase figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    adapter, drafter, prompts, eos, what = _load(args)
    k, d, n = (int(x) for x in args.tree.split(","))
    warp = WarpConfig(temperature=args.temperature)
    if args.batch > 1:
        from specvlm_lit.decoding.batched import BatchedSpeculativeDecoder

        dec = BatchedSpeculativeDecoder(adapter, drafter, TreeConfig(k, d, n), warp)
    else:
        dec = SpeculativeDecoder(adapter, drafter, TreeConfig(k, d, n), warp)
    with torch.inference_mode():
        _decode_all(dec, prompts[:1], args, eos, 1 if args.batch == 1 else min(args.batch, len(prompts)))  # warm-up
        ar_ms = _ar_step_ms(adapter, prompts, args, eos)
        t0 = time.perf_counter()
        stats = _decode_all(dec, prompts, args, eos, args.batch)
        wall = time.perf_counter() - t0
        undo = _install_ranges(dec)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if adapter.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        try:
            with torch.profiler.profile(activities=activities) as prof:
                pstats = _decode_all(dec, prompts, args, eos, args.batch)
        finally:
            for u in reversed(undo):
                u()
    import os

    load = os.getloadavg()
    print(f"# profile_round: {what}")
    print(
        f"target {args.target}, tree {k}/{d}/{n}, T = {args.temperature:g}, batch {args.batch}, {len(prompts)} "
        f"prompts, max_new_tokens {args.max_new_tokens}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; timed pass {wall:.2f} s"
    )
    print()
    if args.batch == 1:
        lines = _phase_table(stats, ar_ms)
    else:
        new = sum(sum(s.new_tokens) for s in stats)
        rounds = sum(s.rounds for s in stats)
        lines = [
            f"batched: {new} tokens in {wall:.2f} s = {new / wall:.1f} tokens/s, {rounds} batched rounds "
            f"({1000 * wall / max(rounds, 1):.1f} ms each, prefill included); own-AR step {ar_ms:.2f} ms"
        ]
    print("\n".join(lines))
    rounds = sum(s.verify_rounds if args.batch == 1 else s.rounds for s in pstats) or 1
    ev = prof.key_averages()
    ranges = sorted(
        (
            e
            for e in ev
            if e.key.split(":")[0] in {"round", "draft", "verify", "extend"}
            or e.key.startswith(("target forward", "KV compaction"))
        ),
        key=lambda e: -e.cpu_time_total,
    )
    print("\nProfiled ranges (inclusive CPU time, profiled pass):\n")
    print("| range | calls | ms / round | us / call |")
    print("|---|---|---|---|")
    for e in ranges:
        print(
            f"| {e.key} | {e.count} | {e.cpu_time_total / 1000 / rounds:.3f} | "
            f"{e.cpu_time_total / max(e.count, 1):.1f} |"
        )
    print(f"\nTop {args.rows} ops by self CPU time:\n")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "what": what,
                    "tree": [k, d, n],
                    "batch": args.batch,
                    "threads": torch.get_num_threads(),
                    "load": list(load),
                    "wall_s": wall,
                    "ar_step_ms": ar_ms,
                    "phases": lines,
                    "ranges": {
                        e.key: {"calls": e.count, "ms_per_round": e.cpu_time_total / 1000 / rounds} for e in ranges
                    },
                    "sigma": statistics.fmean(s.sigma for s in stats) if args.batch == 1 else None,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
