"""Running the benchmark: load every method once, then time them interleaved on the same prompts.

For every temperature, each method first gets ``warmup`` untimed runs on the first sample (a method that fails
there is skipped at that temperature, with the reason). Then, per sample (held-out or the user's:
:func:`benchmark_samples`) and per repeat (``bench.repeats``), every method decodes the *same* prepared prompt
right after the others, in an order that rotates from round to round (:mod:`.schedule`), so load drifts hit all
methods alike and no method always runs right after another. Each run is paired with the AR runs of its round for
the ratios (:mod:`.stats`). Image encoding is inside every method's timed region. The load average is read just
before and right after the timed runs (:mod:`.load`).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..pipeline import DecodeInputError, drafter_kind, find_exported_drafters, pick_drafter
from .aggregate import rounded, summarise_results, temperature_key
from .baselines import load_assistant, run_hf_method
from .batch import summarise_batches, time_batches
from .load import load_average, load_report
from .methods import DRAFTER_KINDS, OWN_AR, SPEC_METHODS, drafter_of
from .prompts import read_user_prompts
from .report import build_report, write_report
from .samples import Sample, collect_samples, resolve_test_urls
from .schedule import order_for_round
from .settings import BenchSettings

__all__ = ["MethodRunner", "benchmark_samples", "machine_info", "run_benchmark", "time_methods"]


def machine_info(device: str, dtype: str) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "dtype": dtype,
        "note": "timings measured side by side in one process on this machine; compare ratios (tau), "
        "not absolute times, across machines",
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


class MethodRunner:
    """The target, every drafter and the assistant, loaded once; :meth:`run` times one method on one prompt.

    ``skipped`` maps a method that cannot run at all to the reason (no drafter of its kind, no assistant).
    """

    def __init__(self, s: BenchSettings, log):
        from ...drafter.base import load_drafter
        from ..pipeline import SpecVLMPipeline

        self.s, self.log = s, log
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.base = SpecVLMPipeline(s.target, None, dtype=s.dtype, device=s.device, tree=s.tree)
        self.adapter = self.base.adapter
        fingerprint = self.adapter.fingerprint()
        self.drafter_paths: dict[str, str | None] = {}
        self.pipes = {}
        # Each drafter kind is loaded once; its static and adaptive rows share it.
        needed = {drafter_of(m) for m in SPEC_METHODS if m in s.methods}
        loaded: dict[str, tuple[str, Any]] = {}
        for m in DRAFTER_KINDS:
            if m not in needed:
                continue
            path = s.drafters.get(m)
            if path is None:
                cands = find_exported_drafters(s.outputs_root, m) if s.outputs_root else []
                found = pick_drafter(cands, fingerprint)
                if found is None:
                    what = "no compressor" if m == "eaglevlm" else "compressor=select"
                    why = (
                        (
                            f"found {len(cands)} exported {m} drafter(s) but none for this target (fingerprint "
                            f"{fingerprint})"
                        )
                        if cands
                        else f"no exported {m} drafter ({what})"
                    )
                    train = "compressor=none" if m == "eaglevlm" else "compressor=select"
                    self.skipped[m] = (
                        f"{why} under {s.outputs_root}; run `python train.py {train}` or pass "
                        f"bench.drafters.{m}=<drafter dir>"
                    )
                    continue
                path = str(found)
            drafter = load_drafter(path, target=self.adapter, dtype=self.base.adapter.dtype, device=s.device)
            kind = drafter_kind({"compressor": drafter.config.compressor})
            if kind != m:
                self.notes.append(f"{m}: the drafter at {path} is of kind {kind!r}, not {m!r}")
            loaded[m] = (str(path), drafter)
        for row in SPEC_METHODS:
            if row not in s.methods:
                continue
            kind = drafter_of(row)
            if kind not in loaded:
                self.skipped[row] = self.skipped[kind]
                continue
            path, drafter = loaded[kind]
            tree = s.tree if row == kind else {**s.tree, "adaptive": True}
            self.pipes[row] = SpecVLMPipeline.from_components(self.adapter, self.base.processor, drafter, tree=tree)
            self.drafter_paths[row] = path
        self.assistant = None
        if "assisted" in s.methods:
            self.assistant, why = load_assistant(s, self.base)
            if why is not None:
                self.skipped["assisted"] = why

    def run(self, method: str, inputs, a_pixels, warp, seed, *, ttft: bool = True) -> dict:
        """One timed run -> its record (tokens, new tokens, target forwards, wall time, TTFT, drafter cost)."""
        if method == OWN_AR:
            return self._run_own_ar(inputs, warp, seed)
        if method not in SPEC_METHODS:
            return run_hf_method(method, self.base, self.s, self.assistant, inputs, a_pixels, warp, seed, ttft=ttft)
        p = self.pipes[method]
        t0 = time.perf_counter()
        res = p.decode(inputs, max_new_tokens=self.s.max_new_tokens, warp=warp, seed=seed)
        rec: dict[str, Any] = {"time_s": time.perf_counter() - t0}
        st = res.stats
        rec.update(
            tokens=res.tokens.tolist(),
            new_tokens=st.new_tokens,
            target_forwards=st.rounds,
            ttft_s=st.time_prefill,
            drafter_visual_tokens=st.draft_visual_tokens,
            draft_kv=st.draft_kv_len,
            draft_kv_bytes=st.draft_kv_len * p.draft_kv_bytes_per_row(),
            verify_rounds=st.verify_rounds,
            time_draft_s=st.time_draft,
            time_verify_s=st.time_verify,
            time_other_s=st.time_other,
            tree_nodes=sum(st.tree_sizes),
            tree_depth=sum(st.tree_depths),
        )
        return rec

    def _run_own_ar(self, inputs, warp, seed) -> dict:
        """This project's AR loop on the target (:mod:`~specvlm_lit.decoding.autoregressive`); its prefill is the
        TTFT, as for the speculative methods."""
        import torch

        from ..autoregressive import AutoregressiveDecoder

        ad = self.adapter
        # Seeded like the speculative methods; on CPU this stream equals HF's torch.manual_seed(seed) stream.
        generator = None if seed is None else torch.Generator(device=ad.device).manual_seed(int(seed))
        t0 = time.perf_counter()
        res = AutoregressiveDecoder(ad, warp).generate(
            inputs.input_ids,
            pixel_values=inputs.pixel_values,
            max_new_tokens=self.s.max_new_tokens,
            eos_token_id=self.base.eos_token_id,
            generator=generator,
        )
        elapsed = time.perf_counter() - t0
        st = res.stats
        return {
            "tokens": res.tokens.tolist(),
            "new_tokens": st.new_tokens,
            "target_forwards": st.rounds,
            "time_s": elapsed,
            "ttft_s": st.time_prefill,
            "drafter_visual_tokens": None,
            "draft_kv": None,
            "draft_kv_bytes": None,
        }


def _error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def time_methods(
    runner: MethodRunner, s: BenchSettings, prepared: list, *, progress: bool
) -> tuple[list[dict], dict[tuple[str, str], str]]:
    """Warm-up, then ``s.repeats`` interleaved rounds of every active method per prepared sample, per temperature
    (see the module doc). A round's method order comes from :func:`~.schedule.order_for_round`.

    Returns the run records (``key`` = sample index, ``repeat``, ``position`` in its round) and
    ``{(method, temperature key): why}`` for methods that failed their warm-up.
    """
    import torch
    import transformers
    from tqdm.auto import tqdm

    from ..configs import WarpConfig

    active = [m for m in s.methods if m not in runner.skipped]
    per_t_runs = len(prepared) * s.repeats * len(active) + s.warmup * len(active)
    runs: list[dict] = []
    skipped_t: dict[tuple[str, str], str] = {}
    bar = tqdm(
        total=per_t_runs * len(s.temperatures),
        desc="bench",
        unit="run",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    with torch.no_grad():
        for t in s.temperatures:
            warp = WarpConfig(temperature=t, top_k=s.top_k, top_p=s.top_p)
            tk = temperature_key(t)
            # warm-up (untimed): first sample, every method; a method failing here is skipped at this T
            for m in active:
                for _ in range(s.warmup):
                    bar.set_postfix_str(f"T={t:g} warm-up {m}")
                    smp, inp, a_px = prepared[0]
                    try:
                        runner.run(m, inp, a_px, warp, s.seed, ttft=False)
                    except Exception as e:  # noqa: BLE001 - reported, not hidden
                        skipped_t[(m, tk)] = f"failed in transformers {transformers.__version__}: {_error_text(e)}"
                    bar.update(1)
            for i, (smp, inp, a_px) in enumerate(prepared):
                # Every repeat of a prompt uses the same seed: repeats differ in timing only, never in output.
                seed = None if s.seed is None else s.seed + i
                for rep in range(s.repeats):
                    for pos, m in enumerate(order_for_round(active, i * s.repeats + rep)):
                        bar.set_postfix_str(f"T={t:g} {smp.resolution}px {m}")
                        if (m, tk) in skipped_t:
                            bar.update(1)
                            continue
                        base = {
                            "method": m,
                            "temperature": t,
                            "resolution": smp.resolution,
                            "sample": smp.id,
                            "task": smp.task,
                            "key": i,
                            "repeat": rep,
                            "position": pos,
                            "target_visual_tokens": inp.n_visual,
                            "prompt_len": inp.prompt_len,
                        }
                        try:
                            rec = runner.run(m, inp, a_px, warp, seed)
                        except Exception as e:  # noqa: BLE001
                            rec = {"error": _error_text(e)}
                        runs.append({**base, **rec})
                        bar.update(1)
    bar.close()
    return runs, skipped_t


def benchmark_samples(s: BenchSettings, log: Callable[[str], None]) -> tuple[list[str], list[Sample], list[str]]:
    """``(sources, samples, notes)``: the user's ``bench.prompts`` (:mod:`.prompts`) when set, else the held-out
    test samples per resolution (:mod:`.samples`). Read and checked before any model loads."""
    if s.prompts is None:
        urls = resolve_test_urls(s, log)
        return urls, collect_samples(urls, s.resolutions, s.samples_per_resolution, s.tasks), []
    user = read_user_prompts(s.prompts, s.limit)
    notes = [
        "bench.prompts is set: bench.resolutions, bench.samples_per_resolution and bench.tasks do not apply; every "
        "image is decoded at its own size (a sample's resolution is its image's longest side) and per_task holds "
        "the prompts' categories"
        + (f"; the first {s.limit} prompt(s) were used (bench.limit)" if s.limit is not None else "")
    ]
    if user.skipped:
        left_out = ", ".join(f"{n} {why}" for why, n in sorted(user.skipped.items()))
        notes.append(f"shard samples left out of bench.prompts: {left_out} (the bench decodes one image per request)")
        log(f"warning: {notes[-1]}")
    return user.sources, user.samples, notes


def run_benchmark(s: BenchSettings, *, progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Run the benchmark described by ``s``; write bench.json / bench.md / bench.png into ``s.out_dir``. Every
    warning of the report (busy machine, too few prompts for an interval) is also passed to ``log``."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = Path(s.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources, samples, source_notes = benchmark_samples(s, log)

    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # HF repeats a deprecation warning inside every assistant call
    try:
        runner = MethodRunner(s, log)
        machine = machine_info(s.device, s.dtype)
        prepared = []
        for smp in samples:
            try:
                inp = runner.base.prepare(smp.image, smp.question, max_new_tokens=s.max_new_tokens)
            except DecodeInputError as e:  # e.g. an image too small or a prompt too long for this target
                raise DecodeInputError(f"bench.prompts {smp.source}: {e}" if smp.source else str(e)) from None
            a_px = runner.assistant.pixels(smp.image) if runner.assistant is not None else None
            prepared.append((smp, inp, a_px))
        load_before = load_average()
        runs, skipped_t = time_methods(runner, s, prepared, progress=progress)
        batch_runs, batch_skipped = [], {}
        if s.batch_sizes:
            ar_tokens = {
                r["key"]: r["tokens"]
                for r in runs
                if r["method"] == "ar" and r["temperature"] == 0.0 and r["repeat"] == 0 and "error" not in r
            }
            batch_runs, batch_skipped = time_batches(runner, s, prepared, ar_tokens)
        load_after = load_average()
        results = summarise_results(s.methods, s.temperatures, runs, runner.skipped, skipped_t)
        batch = summarise_batches(s.batch_sizes, batch_runs, batch_skipped) if s.batch_sizes else None
        ar_spread = {tk: r.get("time_spread") for tk, r in results["ar"].items()}
        load = load_report(load_before, load_after, machine["cpu_count"], machine["torch_threads"], ar_spread)
        report = build_report(s, machine, load, sources, runner, results, samples, prepared, runs, source_notes)
        if batch is not None:
            as_json = [{k: (rounded(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in batch_runs]
            report["batch"] = {"results": batch, "runs": as_json}
    finally:
        transformers.logging.set_verbosity(verbosity)
    write_report(report, out_dir)
    for warning in report["warnings"]:
        log(f"warning: {warning}")
    return out_dir
