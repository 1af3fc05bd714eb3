"""The benchmark's statistics, load warnings and method order on synthetic numbers; the own AR loop against HF
``generate()``; one tiny end-to-end ``run_benchmark`` (repeats=2) on the tiny target with a random drafter.

No timing thresholds anywhere: timings on a shared machine are whatever they are; only their bookkeeping is checked.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter

import pytest
import torch

from specvlm_lit.decoding.bench import load as bench_load
from specvlm_lit.decoding.bench.aggregate import summarise_results
from specvlm_lit.decoding.bench.schedule import balanced_orders, order_for_round
from specvlm_lit.decoding.bench.stats import median_interval, per_prompt_ratios, relative_spread, total_ratio


# ------------------------------------------------------------------------------------------------ statistics
def test_median_interval_uses_the_order_statistics_with_exact_binomial_coverage():
    values = [float(v) for v in range(16, 0, -1)]  # unsorted on purpose: 1 .. 16
    mi = median_interval(values)
    # Bin(16, 1/2): P(B <= 3) = 697 / 65536, P(B <= 4) = 2517 / 65536 > 0.025, so k = 4: [x_4, x_13].
    assert (mi.median, mi.low, mi.high, mi.n) == (8.5, 4.0, 13.0, 16)
    assert mi.level == pytest.approx(1 - 2 * 697 / 65536) and mi.level >= 0.95
    assert mi.warning is None
    six = median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0])  # the smallest n with a 95% interval: [min, max]
    assert (six.low, six.high, six.median) == (1.0, 6.0, 3.5) and six.level == pytest.approx(1 - 2 / 64)
    assert six.warning is None


@pytest.mark.parametrize("n", [6, 7, 10, 16, 31, 100])
def test_median_interval_covers_the_median_and_is_the_tightest_at_95_percent(n):
    xs = [math.sin(i) * 3 + i / 7 for i in range(n)]
    mi = median_interval(xs)
    assert mi.low <= mi.median <= mi.high and mi.level >= 0.95
    k = sorted(xs).index(mi.low) + 1
    tighter = 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n  # coverage of [x_{k+1}, x_{n-k}]
    assert tighter < 0.95


def test_too_few_prompts_give_min_max_with_its_coverage_and_a_warning():
    one = median_interval([1.3])
    assert (one.median, one.low, one.high, one.level, one.n) == (1.3, 1.3, 1.3, 0.0, 1)
    assert "1 prompt(s) are too few" in one.warning
    five = median_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (five.low, five.high) == (1.0, 5.0) and five.level == pytest.approx(1 - 2 / 32)
    assert "94%" in five.warning
    empty = median_interval([])
    assert empty.median is None and empty.n == 0


def test_paired_ratios_take_the_median_over_repeats_per_prompt():
    ar = {(0, 0): 2.0, (0, 1): 2.0, (0, 2): 9.0, (1, 0): 3.0, (1, 1): 3.0}
    method = {(0, 0): 1.0, (0, 1): 2.0, (0, 2): 1.0, (1, 0): 1.5, (1, 1): 1.0, (2, 0): 1.0}  # (2, 0): no AR partner
    # prompt 0: ratios 2, 1, 9 -> 2 (the disturbed repeat does not move it); prompt 1: 2, 3 -> 2.5
    assert per_prompt_ratios(ar, method) == {0: 2.0, 1: 2.5}
    assert total_ratio(ar, method) == pytest.approx(19.0 / 6.5)
    assert relative_spread({0: [1.0, 2.0, 1.0], 1: [4.0, 4.0], 2: [5.0]}) == pytest.approx(0.5)  # median(1, 0)
    assert relative_spread({0: [1.0]}) is None


def _run(method, key, rep, time_s, tokens=(1, 2)):
    return {
        "method": method,
        "temperature": 0.0,
        "key": key,
        "repeat": rep,
        "task": "describe",
        "resolution": 64,
        "time_s": time_s,
        "tokens": list(tokens),
        "new_tokens": len(tokens),
        "target_forwards": len(tokens),
        "ttft_s": time_s / 4,
    }


def test_results_report_tau_against_both_baselines_and_the_old_total_ratio():
    runs = []
    for key in range(6):
        for rep in range(2):
            load = 3.0 if (key, rep) == (0, 1) else 1.0  # one round on a loaded machine slows every method alike
            runs += [
                _run("ar", key, rep, 2.0 * load),
                _run("ar_own", key, rep, 1.6 * load),
                _run("specvlm", key, rep, (1.0 + key / 10) * load),
            ]
    res = summarise_results(["ar", "ar_own", "specvlm"], [0.0], runs, {}, {})
    spec, own, ar = res["specvlm"]["0.0"], res["ar_own"]["0.0"], res["ar"]["0.0"]
    per_prompt = sorted(2.0 / (1.0 + k / 10) for k in range(6))
    assert spec["tau"] == pytest.approx((per_prompt[2] + per_prompt[3]) / 2, abs=1e-4)
    assert spec["tau_ci"] == [pytest.approx(per_prompt[0], abs=1e-4), pytest.approx(per_prompt[-1], abs=1e-4)]
    assert spec["tau_own"] == pytest.approx(spec["tau"] * 0.8, abs=1e-3)  # own AR is 20% faster than HF AR here
    sums = {m: sum(r["time_s"] for r in runs if r["method"] == m) for m in ("ar", "specvlm")}
    assert spec["tau_total"] == pytest.approx(sums["ar"] / sums["specvlm"], abs=1e-4)  # the loaded round weighs in
    assert spec["tau_total"] != pytest.approx(spec["tau"], abs=1e-3)
    assert (spec["n"], spec["n_runs"], spec["identical"]) == (6, 12, 1.0)
    assert ar["tau"] == 1.0 and ar["tau_ci"] == [1.0, 1.0] and own["tau_own"] == 1.0
    assert own["tau"] == pytest.approx(1.25)  # the leaner loop's own gain over HF generate()
    assert ar["time_spread"] == pytest.approx(0.0)  # median over prompts: only prompt 0 moved
    assert "tau_ci_warning" not in spec


def test_results_without_own_ar_and_with_one_prompt_degrade_gracefully():
    runs = [_run("ar", 0, 0, 2.0), _run("specvlm", 0, 0, 1.0, tokens=(1, 3))]
    spec = summarise_results(["ar", "specvlm"], [0.0], runs, {}, {})["specvlm"]["0.0"]
    assert spec["tau"] == 2.0 and spec["tau_ci"] == [2.0, 2.0] and spec["tau_ci_level"] == 0.0
    assert "too few" in spec["tau_ci_warning"] and "tau_own" not in spec
    assert spec["identical"] == 0.0 and spec["time_spread"] is None


# ----------------------------------------------------------------------------------------------- load warning
def _load(monkeypatch, reading):
    monkeypatch.setattr(os, "getloadavg", lambda: reading)
    return bench_load.load_average()


def test_load_warnings_flag_a_busy_machine_before_and_after(monkeypatch):
    quiet, busy = _load(monkeypatch, (0.31, 0.5, 0.6)), _load(monkeypatch, (7.9, 6.0, 5.0))
    assert quiet == [0.31, 0.5, 0.6]
    ok = bench_load.load_report(quiet, [3.9, 3.0, 2.0], cores=4, torch_threads=4, ar_spread={"0.0": 0.05})
    assert not ok["busy"] and ok["warnings"] == []  # after: the benchmark's own 4 threads are allowed for
    before = bench_load.load_report(busy, quiet, cores=8, torch_threads=1, ar_spread={})
    assert before["busy"] and len(before["warnings"]) == 1 and "before the timed runs" in before["warnings"][0]
    assert before["limits"]["load1_before"] == 7.5  # 8 cores - 1 thread + 0.5
    after = bench_load.load_report(quiet, busy, cores=4, torch_threads=4, ar_spread={})
    assert after["busy"] and "during the timed runs" in after["warnings"][0]
    few_free = bench_load.load_report([1.2, 1, 1], None, cores=2, torch_threads=2, ar_spread={})
    assert few_free["busy"]  # a 1.2 load leaves no core free for the second torch thread


def test_load_warnings_flag_unstable_repeats_and_survive_a_platform_without_load(monkeypatch):
    r = bench_load.load_report(None, None, cores=None, torch_threads=1, ar_spread={"0.0": 0.1, "1.0": 0.4})
    assert r["busy"] and len(r["warnings"]) == 1 and "T = 1" in r["warnings"][0]
    monkeypatch.delattr(os, "getloadavg")
    assert bench_load.load_average() is None


# ------------------------------------------------------------------------------------------------ interleaving
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_method_order_is_balanced_so_no_method_always_follows_another(n):
    methods = [f"m{i}" for i in range(n)]
    rows = balanced_orders(methods)
    assert all(sorted(r) == methods for r in rows)
    positions = Counter((r.index(m), m) for r in rows for m in methods)
    assert set(positions.values()) == {len(rows) // n}  # every method in every position equally often
    if n > 1:
        after = Counter((r[i], r[i + 1]) for r in rows for i in range(n - 1))
        assert len(after) == n * (n - 1) and len(set(after.values())) == 1  # every ordered pair equally often
    assert [order_for_round(methods, k) for k in range(2 * len(rows))] == rows + rows  # deterministic cycle


# ------------------------------------------------------------------------------------------------ own AR loop
@pytest.fixture(scope="module")
def tiny(tiny_target, small_corpus):
    from specvlm_lit.decoding.pipeline import SpecVLMPipeline
    from specvlm_lit.synthetic.samples import iter_test_samples

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = SpecVLMPipeline(tiny_target)
    shards = sorted(str(p) for p in small_corpus.glob("test-*.tar"))
    prepared = [pipe.prepare(img, rec["conversations"][0]["value"]) for img, rec in iter_test_samples(shards, 3)]
    yield pipe, prepared
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "warp", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)]
)
def test_own_ar_loop_is_token_identical_to_hf_generate(tiny, warp):
    """Greedy: identical by construction. Sampling: the same warped law drawn from the same seeded CPU stream, so
    HF's torch.manual_seed(seed) run and our Generator(seed) run draw the same tokens."""
    from specvlm_lit.decoding.autoregressive import AutoregressiveDecoder
    from specvlm_lit.decoding.configs import WarpConfig

    pipe, prepared = tiny
    cfg = WarpConfig(**warp)
    for seed, inp in enumerate(prepared):
        ref, _, counter = pipe.hf_generate(inp, max_new_tokens=24, warp=cfg, seed=seed)
        res = AutoregressiveDecoder(pipe.adapter, cfg).generate(
            inp.input_ids,
            pixel_values=inp.pixel_values,
            max_new_tokens=24,
            eos_token_id=pipe.eos_token_id,
            generator=torch.Generator().manual_seed(seed),
        )
        tokens = res.tokens.tolist()
        assert tokens == ref
        assert all(0 <= t < pipe.adapter.vocab_size for t in tokens)
        st = res.stats
        assert st.rounds == counter.calls == len(tokens) and st.sigma == 1.0
        assert st.finished_by_eos == (tokens[-1] == pipe.eos_token_id)
        assert st.target_kv_len == inp.prompt_len + len(tokens) - 1
        assert st.time_total == pytest.approx(st.time_prefill + st.time_verify)


def test_own_ar_loop_stops_at_the_budget_and_takes_encoded_images(tiny):
    from specvlm_lit.decoding.autoregressive import AutoregressiveDecoder

    pipe, prepared = tiny
    inp = prepared[0]
    dec = AutoregressiveDecoder(pipe.adapter)
    feats = pipe.adapter.encode_images(inp.pixel_values)
    one = dec.generate(inp.input_ids, image_features=feats, max_new_tokens=1)
    five = dec.generate(inp.input_ids, pixel_values=inp.pixel_values, max_new_tokens=5, eos_token_id=None)
    assert one.tokens.tolist() == five.tokens.tolist()[:1] and len(five.tokens) == 5
    assert five.stats.verify_rounds == 4 and not five.stats.finished_by_eos
    with pytest.raises(ValueError, match="either image_features or pixel_values"):
        dec.generate(inp.input_ids, image_features=feats, pixel_values=inp.pixel_values, max_new_tokens=2)


# ------------------------------------------------------------------------------------------------ end to end
def test_run_benchmark_interleaves_repeats_and_reports_intervals_and_load(tiny, small_corpus, tmp_path):
    from specvlm_lit.decoding.bench import BenchSettings, run_benchmark
    from specvlm_lit.drafter.eagle import EagleVLMDrafter, save_atomically

    pipe, _ = tiny
    torch.manual_seed(0)
    drafter = save_atomically(EagleVLMDrafter.for_target(pipe.adapter, compressor=None), tmp_path / "drafter")
    methods = ["ar", "ar_own", "eaglevlm"]
    s = BenchSettings(
        target=str(pipe.target_path),
        out_dir=str(tmp_path / "bench"),
        test_urls=[str(p) for p in sorted(small_corpus.glob("test-*.tar"))],
        resolutions=[64],
        samples_per_resolution=2,
        temperatures=[0.0, 1.0],
        max_new_tokens=8,
        methods=methods,
        drafters={"eaglevlm": str(drafter), "specvlm": None},
        repeats=2,
        tree={"top_k": 4, "depth": 3, "total_tokens": 8},
    )
    logged: list[str] = []
    out = run_benchmark(s, progress=False, log=logged.append)
    report = json.loads((out / "bench.json").read_text())
    assert list(report["results"]) == methods
    for t in ("0.0", "1.0"):
        for m in methods:
            r = report["results"][m][t]
            assert (r["n"], r["n_runs"]) == (2, 4) and not r.get("errors"), (m, t, r)
            assert r["tau"] > 0 and r["tau_own"] > 0 and r["tau_total"] > 0
            assert r["tau_ci"][0] <= r["tau"] <= r["tau_ci"][1] and r["tau_ci_level"] == 0.5  # 2 prompts: [min, max]
        assert report["results"]["ar"][t]["tau"] == 1.0 and report["results"]["ar_own"][t]["tau_own"] == 1.0
        assert report["results"]["eaglevlm"][t]["breakdown"]["ar_own_step_ms"] > 0
    for m in methods:
        assert report["results"][m]["0.0"]["identical"] == 1.0
    # Interleaving: per temperature, 2 prompts x 2 repeats rounds of every method, in rotating orders.
    timed = [r for r in report["runs"] if r["temperature"] == 0.0]
    assert Counter((r["key"], r["repeat"]) for r in timed) == {(k, j): 3 for k in range(2) for j in range(2)}
    first = [r["method"] for r in timed if r["position"] == 0]
    assert len(set(first)) == 3  # 4 rounds: the first slot rotates through every method
    load = report["load"]
    assert {"loadavg_before", "loadavg_after", "cores", "torch_threads", "busy", "limits"} <= set(load)
    assert "too few" in " ".join(report["warnings"])  # two prompts cannot give a 95% interval
    assert [f"warning: {w}" for w in report["warnings"]] == logged[-len(report["warnings"]) :]
    md = (out / "bench.md").read_text()
    assert "**Warning:**" in md and "tau vs own AR [95% CI]" in md and "Load average" in md
    assert "AR (own loop)" in md and "AR step (own)" in md


# ------------------------------------------------------------------------------------- options and long answers
@pytest.mark.parametrize(
    "bench, message",
    [
        ({"repeats": 0}, "bench.repeats must be an integer >= 1, got 0"),
        ({"tasks": []}, "bench.tasks must be null (every task) or a non-empty list"),
        ({"tasks": 3}, "bench.tasks must be null (every task) or a non-empty list"),
    ],
)
def test_repeats_and_tasks_options_are_checked_before_model_work(tmp_path, bench, message):
    from specvlm_lit.decoding.bench import settings_from_config
    from specvlm_lit.decoding.pipeline import DecodeInputError

    cfg = {"target": str(tmp_path), "bench": {"test_urls": "t-*.tar", "assistant": None, **bench}}
    with pytest.raises(DecodeInputError) as e:
        settings_from_config(cfg, str(tmp_path / "out"), tmp_path)
    assert message in str(e.value)


def test_long_answer_setting_keeps_only_describe_samples(tmp_path, small_corpus):
    from specvlm_lit.decoding.bench import collect_samples, settings_from_config
    from specvlm_lit.decoding.pipeline import DecodeInputError

    cfg = {"target": str(tmp_path), "bench": {"test_urls": "t", "tasks": "describe", "max_new_tokens": 256}}
    s = settings_from_config(cfg, str(tmp_path / "out"), tmp_path)
    assert (s.tasks, s.max_new_tokens, s.repeats) == (["describe"], 256, 3)
    urls = sorted(str(p) for p in small_corpus.glob("test-*.tar"))
    samples = collect_samples(urls, [64], 3, s.tasks)
    assert [x.task for x in samples] == ["describe"] * 3
    assert all("describ" in x.question.lower() for x in samples)
    with pytest.raises(DecodeInputError, match=r"of task\(s\) \['poetry'\] \(the split has \{.*'describe'"):
        collect_samples(urls, [64], 1, ["poetry"])


# ------------------------------------------------------------------------------------- the user's own prompts
def _write_prompts(root, lines: list) -> str:
    """``root/prompts.jsonl`` with one line per item (a dict is written as JSON, a string as it is)."""
    path = root / "prompts.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def user_prompts(tmp_path):
    """Three prompts in two categories: image paths relative to the JSONL and absolute, square and not, PNG and
    JPEG, a blank line in between and an extra field (a reference answer) that is ignored."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), (220, 30, 30)).save(tmp_path / "images/red.png")
    Image.new("RGB", (96, 64), (30, 200, 30)).save(tmp_path / "images/green.jpg")
    Image.new("RGB", (64, 64), (30, 30, 220)).save(tmp_path / "blue.png")
    lines = [
        {"image": "images/red.png", "prompt": "Describe the image.", "category": "captioning"},
        {"image": "images/green.jpg", "prompt": "What colour is the image?", "category": "vqa", "answer": "green"},
        "",
        {"image": str(tmp_path / "blue.png"), "prompt": "Describe the image in detail.", "category": "captioning"},
    ]
    return _write_prompts(tmp_path, lines)


def _user_settings(target, out_dir, prompts, methods, **kw):
    from specvlm_lit.decoding.bench import BenchSettings

    return BenchSettings(
        target=str(target),
        out_dir=str(out_dir),
        test_urls=["/nonexistent/test-*.tar"],  # never read: bench.prompts replaces the test split
        prompts=prompts,
        temperatures=[0.0],
        max_new_tokens=6,
        methods=methods,
        repeats=1,
        tree={"top_k": 4, "depth": 3, "total_tokens": 8},
        **kw,
    )


def test_run_benchmark_on_user_prompts_reports_every_metric_per_category_and_overall(tiny, user_prompts, tmp_path):
    from specvlm_lit.decoding.bench import run_benchmark
    from specvlm_lit.drafter.eagle import EagleVLMDrafter, save_atomically

    pipe, _ = tiny
    torch.manual_seed(0)
    drafter = save_atomically(EagleVLMDrafter.for_target(pipe.adapter, compressor=None), tmp_path / "drafter")
    methods = ["ar", "ar_own", "eaglevlm"]
    s = _user_settings(
        pipe.target_path,
        tmp_path / "bench",
        user_prompts,
        methods,
        drafters={"eaglevlm": str(drafter), "specvlm": None},
    )
    out = run_benchmark(s, progress=False, log=lambda _: None)
    report = json.loads((out / "bench.json").read_text())
    assert list(report["results"]) == methods
    metrics = {"tau", "tau_ci", "tau_total", "tau_own", "sigma", "tokens_per_s", "ttft_ms", "identical", "n_runs"}
    for m in methods:
        overall = report["results"][m]["0.0"]
        assert (overall["n"], overall["n_runs"]) == (3, 3) and not overall.get("errors"), (m, overall)
        per = overall["per_task"]
        assert list(per) == ["vqa", "captioning"]  # grouped like task types: shorter names first
        assert (per["captioning"]["n"], per["vqa"]["n"]) == (2, 1)
        for row in (overall, *per.values()):
            assert metrics <= set(row) and row["identical"] == 1.0 and row["tau"] > 0, (m, row)
        # the overall row is the same aggregate over all three prompts, not a mean of the categories
        assert overall["new_tokens_mean"] == pytest.approx(
            (2 * per["captioning"]["new_tokens_mean"] + per["vqa"]["new_tokens_mean"]) / 3, abs=1e-2
        )
    assert "breakdown" in report["results"]["eaglevlm"]["0.0"]["per_task"]["captioning"]
    # Each prompt at its own image size, named by its line; the synthetic test split was never looked for.
    assert [(x["id"], x["task"], x["resolution"], x["source"]) for x in report["samples"]] == [
        ("line 1", "captioning", 64, "prompts.jsonl line 1"),
        ("line 2", "vqa", 96, "prompts.jsonl line 2"),
        ("line 4", "captioning", 64, "prompts.jsonl line 4"),
    ]
    assert report["config"]["prompts_resolved"] == [user_prompts] and "test_urls_resolved" not in report["config"]
    assert any(
        "bench.resolutions, bench.samples_per_resolution and bench.tasks do not apply" in n for n in report["notes"]
    )
    assert Counter(r["method"] for r in report["runs"]) == {m: 3 for m in methods}  # 3 prompts x 1 repeat
    md = (out / "bench.md").read_text()
    assert "3 prompt(s) from" in md and "per category: captioning 2, vqa 1" in md
    assert "Per category at T = 0:" in md and "| AR (own loop) | vqa |" in md


def test_bench_limit_uses_the_first_prompts_but_checks_every_line(user_prompts, tmp_path):
    from specvlm_lit.decoding.bench.prompts import read_user_prompts
    from specvlm_lit.decoding.pipeline import DecodeInputError

    assert [x.id for x in read_user_prompts(user_prompts, limit=2).samples] == ["line 1", "line 2"]
    with open(user_prompts, "a") as f:
        f.write('{"image": "images/red.png", "prompt": ""}\n')
    with pytest.raises(DecodeInputError, match="line 5: the prompt is empty"):
        read_user_prompts(user_prompts, limit=2)


@pytest.mark.parametrize(
    "lines, message",
    [
        (None, r"bench.prompts: .*prompts.jsonl does not exist; give a JSONL file"),
        ([{"image": "a.png", "prompt": "Hi?"}, '{"image": "a.png", "prompt": '], r"line 2 is not valid JSON"),
        ([{"image": "a.png", "prompt": "Hi?"}, {"image": "gone.png", "prompt": "Hi?"}], r"line 2: image .*gone\.png"),
        ([{"image": "a.png", "prompt": "Hi?"}, {"image": "a.png", "prompt": "  "}], r"line 2: the prompt is empty"),
        ([{"image": "a.png"}], r"line 1 has no 'prompt' field"),
        (['["a.png", "Hi?"]'], r"line 1 holds a JSON list, not an object"),
        ([{"image": "a.png", "prompt": "Hi?", "category": 3}], r"line 1: 'category' must be a non-empty string"),
        ([{"image": "bad.png", "prompt": "Hi?"}], r"line 1: cannot read image file .*bad\.png"),
        (["", "  "], r"prompts.jsonl holds no prompts"),
    ],
    ids=[
        "missing-file",
        "malformed-json",
        "missing-image",
        "empty-prompt",
        "no-prompt",
        "not-object",
        "category",
        "corrupt-image",
        "empty-file",
    ],
)
def test_bad_user_prompts_are_one_line_errors_naming_the_line_before_model_work(tmp_path, monkeypatch, lines, message):
    from PIL import Image

    from specvlm_lit.decoding.bench import run_benchmark, runner
    from specvlm_lit.decoding.pipeline import DecodeInputError

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    prompts = str(tmp_path / "prompts.jsonl") if lines is None else _write_prompts(tmp_path, lines)

    def no_model_work(*_):
        raise AssertionError("a model was loaded before the prompts were checked")

    monkeypatch.setattr(runner, "MethodRunner", no_model_work)
    with pytest.raises(DecodeInputError, match=message) as e:
        run_benchmark(_user_settings(tmp_path, tmp_path / "out", prompts, ["ar"]), progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "bench, message",
    [
        ({"limit": 4}, "bench.limit caps how many of bench.prompts are used, and bench.prompts is not set"),
        ({"prompts": "p.jsonl", "limit": 0}, "bench.limit must be an integer >= 1 or null (every prompt), got 0"),
        ({"prompts": ["a", "b"]}, "bench.prompts must be a JSONL file or a directory / brace pattern of shards"),
    ],
)
def test_prompts_and_limit_options_are_checked(tmp_path, bench, message):
    from specvlm_lit.decoding.bench import settings_from_config
    from specvlm_lit.decoding.pipeline import DecodeInputError

    cfg = {"target": str(tmp_path), "bench": {"test_urls": "t-*.tar", "assistant": None, **bench}}
    with pytest.raises(DecodeInputError) as e:
        settings_from_config(cfg, str(tmp_path / "out"), tmp_path)
    assert message in str(e.value)
    # With bench.prompts, the test split is not needed.
    ok = settings_from_config(
        {"target": str(tmp_path), "bench": {"test_urls": None, "prompts": "p.jsonl", "limit": 2, "assistant": None}},
        str(tmp_path / "out"),
        tmp_path,
    )
    assert (ok.prompts, ok.limit, ok.test_urls) == ("p.jsonl", 2, [])


def _write_shard(path, samples):
    import io

    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for key, image, ext, rec in samples:
            sample = {"__key__": key, "json": json.dumps(rec).encode()}
            if image is not None:
                buf = io.BytesIO()
                image.save(buf, format="PNG" if ext == "png" else "JPEG")
                sample[ext] = buf.getvalue()
            w.write(sample)


def test_shards_as_bench_prompts_take_the_first_human_turn_and_its_category(tiny, tmp_path, small_corpus):
    import webdataset as wds
    from PIL import Image

    from specvlm_lit.decoding.bench import run_benchmark
    from specvlm_lit.decoding.bench.prompts import read_user_prompts

    def conv(question):
        return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "An answer."}]

    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(
        shards / "part-000000.tar",
        [
            (
                "s0",
                Image.new("RGB", (64, 64), "red"),
                "png",
                {"conversations": conv("What is red?"), "category": "vqa"},
            ),
            ("s1", None, None, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi."}]}),
        ],
    )
    _write_shard(
        shards / "part-000001.tar",
        [
            (
                "s2",
                Image.new("RGB", (64, 64), "blue"),
                "jpg",
                {"conversations": conv("Describe it."), "tasks": ["describe"]},
            )
        ],
    )
    # The converter's multi-image layout (json "images" names the members): one image per request, so counted.
    with wds.TarWriter(str(shards / "part-000002.tar")) as sink:
        red, blue = io.BytesIO(), io.BytesIO()
        Image.new("RGB", (32, 32), "red").save(red, "png")
        Image.new("RGB", (32, 32), "blue").save(blue, "png")
        rec = {"conversations": conv("Compare them."), "images": ["s3.0.png", "s3.1.png"]}
        sink.write({"__key__": "s3", "json": json.dumps(rec), "0.png": red.getvalue(), "1.png": blue.getvalue()})
    user = read_user_prompts(str(shards))  # a directory of shards
    assert [(x.id, x.task, x.question) for x in user.samples] == [
        ("s0", "vqa", "<image>\nWhat is red?"),
        ("s2", "describe", "<image>\nDescribe it."),
    ]
    assert user.skipped == {"no_image": 1, "multi_image": 1}  # text-only and multi-image: counted, not decoded
    brace = read_user_prompts(str(shards / "part-{000000..000001}.tar"))
    assert [x.id for x in brace.samples] == ["s0", "s2"] and len(brace.sources) == 2
    # the synthetic test shards (this project's format): their task types become the categories
    corpus = read_user_prompts(str(sorted(small_corpus.glob("test-*.tar"))[0]), limit=3)
    assert len(corpus.samples) == 3 and all(x.task != "unknown" for x in corpus.samples)

    pipe, _ = tiny
    logged: list[str] = []
    s = _user_settings(pipe.target_path, tmp_path / "bench", str(shards), ["ar", "ar_own"])
    report = json.loads((run_benchmark(s, progress=False, log=logged.append) / "bench.json").read_text())
    for m in ("ar", "ar_own"):
        r = report["results"][m]["0.0"]
        assert r["n"] == 2 and {k: v["n"] for k, v in r["per_task"].items()} == {"vqa": 1, "describe": 1}
        assert r["identical"] == 1.0
    assert any("left out of bench.prompts: 1 multi_image, 1 no_image" in n for n in report["notes"])
    assert any("1 no_image" in line for line in logged)


def test_cli_bench_with_a_broken_prompts_line_is_one_line_error(tiny_target, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    prompts = _write_prompts(tmp_path, [{"image": "a.png", "prompt": "Hi?"}, "{not json"])
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            "decode.py",
            "mode=bench",
            f"target={tiny_target}",
            f"bench.prompts={prompts}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=repo,
        env=dict(os.environ, PYTHONPATH=str(repo), HYDRA_FULL_ERROR="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    lines = [x for x in (out.stdout + out.stderr).strip().splitlines() if x.strip()]
    assert lines[-1].startswith("error: bench.prompts ") and "line 2 is not valid JSON" in lines[-1], lines[-3:]
    assert "Traceback" not in out.stderr


def test_batch_rows_report_throughput_of_both_batched_methods(tiny, small_corpus, tmp_path):
    """bench.batch_sizes: groups of B prompts, HF batched generate() vs the batched speculative decoder, interleaved
    and repeated; every row identical to HF generate() alone; a batch size larger than the prompts is skipped."""
    from specvlm_lit.decoding.bench import BenchSettings, run_benchmark, settings_from_config
    from specvlm_lit.decoding.pipeline import DecodeInputError
    from specvlm_lit.drafter.eagle import EagleVLMDrafter, save_atomically

    pipe, _ = tiny
    torch.manual_seed(0)
    drafter = save_atomically(EagleVLMDrafter.for_target(pipe.adapter, compressor=None), tmp_path / "drafter")
    s = BenchSettings(
        target=str(pipe.target_path),
        out_dir=str(tmp_path / "bench"),
        test_urls=[str(p) for p in sorted(small_corpus.glob("test-*.tar"))],
        resolutions=[64],
        samples_per_resolution=3,
        temperatures=[0.0],
        max_new_tokens=8,
        methods=["ar", "eaglevlm"],
        drafters={"eaglevlm": str(drafter), "specvlm": None},
        repeats=2,
        batch_sizes=[1, 2, 4],
        tree={"top_k": 4, "depth": 3, "total_tokens": 8},
    )
    out = run_benchmark(s, progress=False, log=lambda *_: None)
    report = json.loads((out / "bench.json").read_text())
    batch = report["batch"]["results"]
    assert "needs at least 4 prompts" in batch["4"]["skipped"]
    for bsz, groups in (("1", 3), ("2", 1)):
        r = batch[bsz]
        assert r["groups"] == groups and r["speedup"] > 0 and r["speedup_total"] > 0, r
        for m in ("hf_batched", "spec_batched"):
            assert r[m]["tokens_per_s"] > 0 and r[m]["n_runs"] == groups * 2
            assert r[m]["identical"] == 1.0, (bsz, m)
    runs = report["batch"]["runs"]
    want = {(1, k, j) for k in range(3) for j in range(2)} | {(2, 0, j) for j in range(2)}
    assert {(r["batch_size"], r["key"], r["repeat"]) for r in runs} == want
    assert "## Batch throughput (T = 0)" in (out / "bench.md").read_text()
    cfg = {"target": str(pipe.target_path), "bench": {"test_urls": ["x"], "batch_sizes": [4, 1, 4]}}
    assert settings_from_config(cfg, str(tmp_path), tmp_path).batch_sizes == [1, 4]
    with pytest.raises(DecodeInputError, match=r"bench.batch_sizes\[0\] must be an integer >= 1"):
        settings_from_config({**cfg, "bench": {"test_urls": ["x"], "batch_sizes": [0]}}, str(tmp_path), tmp_path)
