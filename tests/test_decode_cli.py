"""decode.py (CLI), the SpecVLMPipeline API and the benchmark, on the tiny target with random-weight drafters.

Correctness only: greedy speculative output == HF generate() output, statistics present, every bad input gives a
one-line ``error: ...`` before any model work, and the benchmark writes its files. No timing thresholds anywhere.
Subprocesses run with ``threads=1``: on a loaded 2-core machine torch's intra-op threads thrash on the many tiny
ops of tree drafting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specvlm_lit.decoding.pipeline import (
    DecodeInputError,
    SpecVLMPipeline,
    find_exported_drafters,
    pick_drafter,
)
from specvlm_lit.drafter.eagle import DrafterMismatchError, EagleVLMDrafter, save_atomically
from specvlm_lit.target import TargetAdapter

REPO = Path(__file__).resolve().parents[1]
SMALL_TREE = {"top_k": 4, "depth": 4, "total_tokens": 12}
MAX_NEW = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tiny_target, small_corpus, tmp_path_factory):
    """Target + processor, exported random drafters (none / select / for another target), test images."""
    from transformers import AutoProcessor

    from specvlm_lit.synthetic.samples import iter_test_samples

    root = tmp_path_factory.mktemp("decode")
    adapter = TargetAdapter.from_pretrained(tiny_target)
    processor = AutoProcessor.from_pretrained(tiny_target)
    torch.manual_seed(0)
    paths = {
        "none": save_atomically(EagleVLMDrafter.for_target(adapter, compressor=None), root / "d_none"),
        "select": save_atomically(EagleVLMDrafter.for_target(adapter, compressor={"type": "select"}), root / "d_sel"),
    }
    other = TargetAdapter.from_pretrained(tiny_target)  # "another target": same architecture, other weights
    with torch.no_grad():
        other.embed_tokens.weight.add_(0.05)
        other.lm_head.weight.add_(0.05)
    assert other.fingerprint() != adapter.fingerprint()
    paths["foreign"] = save_atomically(EagleVLMDrafter.for_target(other), root / "d_foreign")
    drafters = {k: EagleVLMDrafter.load(paths[k], target=adapter) for k in ("none", "select")}
    samples = []
    for i, (img, rec) in enumerate(iter_test_samples(sorted(str(p) for p in small_corpus.glob("test-*.tar")), 3)):
        path = root / f"img{i}.png"
        img.save(path)
        samples.append((path, rec["conversations"][0]["value"].replace("<image>\n", "")))
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return {
        "root": root,
        "adapter": adapter,
        "processor": processor,
        "paths": paths,
        "drafters": drafters,
        "samples": samples,
        "corrupt": corrupt,
        "target": tiny_target,
        "corpus": small_corpus,
    }


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [sys.executable, "decode.py", "threads=1", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------------- API
@pytest.mark.parametrize("kind", ["none", "select"])
def test_pipeline_greedy_equals_hf_generate(setup, kind):
    pipe = SpecVLMPipeline.from_components(
        setup["adapter"], setup["processor"], setup["drafters"][kind], tree=SMALL_TREE
    )
    assert pipe.method == ("eaglevlm" if kind == "none" else "specvlm")
    for image, question in setup["samples"]:
        spec = pipe.generate(image, question, max_new_tokens=MAX_NEW)
        ar = pipe.generate_ar(image, question, max_new_tokens=MAX_NEW)
        assert spec.tokens == ar.tokens and spec.text == ar.text
        assert 1 <= len(spec.tokens) <= MAX_NEW
        s = spec.stats
        assert s.new_tokens == len(spec.tokens) and s.rounds >= 1 and 1.0 <= s.sigma <= SMALL_TREE["depth"] + 1
        assert s.target_visual_tokens == pipe.prepare(image, question).n_visual > 0
        if kind == "none":
            assert s.draft_visual_tokens == s.target_visual_tokens
        else:  # the gate may pick any branch, text-only (0 rows) included
            assert 0 <= s.draft_visual_tokens < s.target_visual_tokens
        assert ar.method == "ar" and ar.stats.sigma == 1.0
        assert json.dumps(spec.as_dict())  # JSON-able for servers


def test_pipeline_loads_from_paths_samples_reproducibly_and_falls_back_to_ar(setup):
    pipe = SpecVLMPipeline(setup["target"], setup["paths"]["select"], tree=SMALL_TREE)
    image, question = setup["samples"][0]
    from PIL import Image

    a = pipe.generate(Image.open(image), question, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, seed=7)
    b = pipe.generate(str(image), question, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, seed=7)
    assert a.tokens == b.tokens and 1 <= len(a.tokens) <= MAX_NEW
    plain = SpecVLMPipeline.from_components(pipe.adapter, pipe.processor)
    assert plain.method == "ar"
    assert (
        plain.generate(image, question, max_new_tokens=4).tokens
        == pipe.generate_ar(image, question, max_new_tokens=4).tokens
    )


def test_pipeline_rejects_bad_input_before_any_model_work(setup):
    pipe = SpecVLMPipeline.from_components(
        setup["adapter"], setup["processor"], setup["drafters"]["none"], tree=SMALL_TREE
    )

    def forbid(*_):
        raise AssertionError("model work happened before input validation")

    modules = list(pipe.adapter.model.modules()) + list(pipe.drafter.modules())
    handles = [m.register_forward_pre_hook(forbid) for m in modules]
    image, question = setup["samples"][0]
    cases = [
        (dict(image=setup["root"] / "missing.png"), "does not exist"),
        (dict(image=setup["corrupt"]), "corrupt.png"),
        (dict(image=setup["root"]), "not a file"),
        (dict(image=42), "file path or a PIL.Image"),
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="   \n"), "prompt is empty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(seed=-3), "seed"),
    ]
    try:
        for override, message in cases:
            kwargs = dict(image=image, prompt=question, max_new_tokens=4)
            kwargs.update(override)
            img, prompt = kwargs.pop("image"), kwargs.pop("prompt")
            for fn in (pipe.generate, pipe.generate_ar):
                with pytest.raises(DecodeInputError, match=message):
                    fn(img, prompt, **kwargs)
    finally:
        for h in handles:
            h.remove()


def test_drafter_for_another_target_is_rejected_by_the_api(setup):
    with pytest.raises(DrafterMismatchError, match="fingerprint"):
        SpecVLMPipeline(setup["target"], setup["paths"]["foreign"])
    foreign = EagleVLMDrafter.load(setup["paths"]["foreign"])
    with pytest.raises(DrafterMismatchError, match="fingerprint"):
        SpecVLMPipeline.from_components(setup["adapter"], setup["processor"], foreign)


def test_latest_exported_drafter_is_found_by_kind_and_fingerprint(setup, tmp_path):
    outputs = tmp_path / "outputs"
    layout = [
        ("train/runs/a/drafter", "none"),
        ("train/runs/b/drafter", "select"),
        ("train/multiruns/c/0_x/drafter", "foreign"),
        ("train/runs/d/.drafter.tmp-1", "select"),
    ]
    for i, (rel, kind) in enumerate(layout):
        shutil.copytree(setup["paths"][kind], outputs / rel)
        t = time.time() - 100 + 10 * i
        os.utime(outputs / rel / "model.safetensors", (t, t))
    fp = setup["adapter"].fingerprint()
    everything = find_exported_drafters(outputs)
    assert [p.parent.name for p, _ in everything] == ["0_x", "b", "a"]  # newest first, temp dir ignored
    assert pick_drafter(everything, fp) == outputs / "train/runs/b/drafter"
    assert pick_drafter(find_exported_drafters(outputs, "eaglevlm"), fp) == outputs / "train/runs/a/drafter"
    assert pick_drafter(find_exported_drafters(outputs, "specvlm"), fp) == outputs / "train/runs/b/drafter"
    assert pick_drafter(find_exported_drafters(outputs, "eaglevlm"), "0000") is None
    assert find_exported_drafters(tmp_path / "nowhere") == []


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_generate_prints_the_answer_and_statistics(setup, tmp_path):
    image, question = setup["samples"][1]
    out = cli(
        f"target={setup['target']}",
        f"drafter={setup['paths']['select']}",
        f"image={image}",
        f"prompt={question}",
        f"max_new_tokens={MAX_NEW}",
        "tree.top_k=4",
        "tree.depth=4",
        "tree.total_tokens=12",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    answer, sep, stats = out.stdout.partition("\n\n--- statistics ---\n")
    assert sep, out.stdout
    pipe = SpecVLMPipeline.from_components(setup["adapter"], setup["processor"])
    assert answer == pipe.generate_ar(image, question, max_new_tokens=MAX_NEW).text  # greedy == the target's
    for needle in (
        "method: specvlm",
        "sigma:",
        "rounds",
        "prefill",
        "draft",
        "verify",
        f"visual tokens: target {pipe.prepare(image, question).n_visual}, drafter",
    ):
        assert needle in stats, stats


BAD_INPUTS = [
    ("missing image", ["image={root}/missing.png"], "missing.png does not exist"),
    ("corrupt image", ["image={corrupt}"], "cannot read image file"),
    ("empty prompt", ["prompt="], "prompt is empty"),
    ("max_new_tokens=0", ["max_new_tokens=0"], "max_new_tokens must be an integer >= 1"),
    ("temperature=-1", ["temperature=-1"], "temperature must be a finite number >= 0"),
    ("top_p=0", ["top_p=0"], "top_p must be a number in (0, 1]"),
    ("top_p=1.5", ["top_p=1.5"], "top_p must be a number in (0, 1]"),
    ("tree.adaptive=maybe", ["tree.adaptive=maybe"], "tree.adaptive must be true or false"),
]


def assert_one_line_error(out, message):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-3000:]
    assert out.stderr.rstrip().splitlines()[-1] == errors[0]


def test_cli_bad_inputs_give_one_line_errors(setup, tmp_path):
    image, question = setup["samples"][0]
    fmt = dict(root=setup["root"], corrupt=setup["corrupt"])
    # Fingerprint mismatch needs the target loaded (seconds): start it first, check the cheap cases meanwhile.
    foreign = subprocess.Popen(
        [
            sys.executable,
            "decode.py",
            "threads=1",
            f"target={setup['target']}",
            f"drafter={setup['paths']['foreign']}",
            f"image={image}",
            "prompt=What is it?",
            f"hydra.run.dir={tmp_path / 'foreign'}",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _name, args, message in BAD_INPUTS:
            base = [
                f"target={setup['target']}",
                f"drafter={setup['paths']['none']}",
                f"image={image}",
                "prompt=What is it?",
                f"hydra.run.dir={tmp_path / 'bad'}",
            ]
            out = cli(*base, *[a.format(**fmt) for a in args])
            assert_one_line_error(out, message)
        stdout, stderr = foreign.communicate(timeout=300)
    finally:
        if foreign.poll() is None:
            foreign.kill()
    assert_one_line_error(subprocess.CompletedProcess([], foreign.returncode, stdout, stderr), "fingerprint")


def test_cli_bench_writes_json_markdown_and_plot(setup, tmp_path):
    run_dir = tmp_path / "bench"
    # bench.drafters.specvlm stays null: found under <root>/outputs, skipping a newer export for another target
    root = tmp_path / "root"
    shutil.copytree(setup["paths"]["select"], root / "outputs/train/runs/1/drafter")
    shutil.copytree(setup["paths"]["foreign"], root / "outputs/train/runs/2/drafter")
    (root / "outputs/train/runs/2/drafter/config.json").write_text(
        json.dumps(
            {**json.loads((setup["paths"]["foreign"] / "config.json").read_text()), "compressor": {"type": "select"}}
        )
    )
    os.utime(root / "outputs/train/runs/1/drafter/model.safetensors", (time.time() - 60, time.time() - 60))
    out = cli(
        "mode=bench",
        f"target={setup['target']}",
        f"bench.drafters.eaglevlm={setup['paths']['none']}",
        f"paths.root_dir={root}",
        f"bench.assistant={setup['target']}",
        f"bench.test_urls={setup['corpus']}/test-*.tar",
        "bench.corpus_dir=null",
        "bench.samples_per_resolution=2",
        "bench.max_new_tokens=8",
        "bench.warmup=1",
        "bench.repeats=1",  # tests/test_bench.py runs the repeats; one keeps this CLI run short
        "tree.top_k=4",
        "tree.depth=4",
        "tree.total_tokens=12",
        f"hydra.run.dir={run_dir}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(run_dir.resolve())
    assert "100%" in out.stderr  # the progress bar ran to the end
    report = json.loads((run_dir / "bench.json").read_text())
    assert {"platform", "cpu", "torch_threads", "torch", "transformers"} <= set(report["machine"])
    assert {"loadavg_before", "loadavg_after", "busy", "warnings"} <= set(report["load"])
    assert set(report["load"]["warnings"]) <= set(report["warnings"])
    assert report["config"]["resolutions"] == [64, 128] and report["config"]["temperatures"] == [0.0, 1.0]
    spec_methods = ["eaglevlm", "specvlm", "eaglevlm_adaptive", "specvlm_adaptive"]
    methods = ["ar", "ar_own", "prompt_lookup", "assisted", *spec_methods]
    assert list(report["results"]) == methods
    eagle_dir, spec_dir = str(setup["paths"]["none"]), str(root / "outputs/train/runs/1/drafter")
    assert report["config"]["drafter_paths"] == {
        "eaglevlm": eagle_dir,
        "specvlm": spec_dir,
        "eaglevlm_adaptive": eagle_dir,
        "specvlm_adaptive": spec_dir,
    }
    for m in methods:
        for t in ("0.0", "1.0"):
            r = report["results"][m][t]
            assert "skipped" not in r, (m, t, r)
            assert {
                "tau",
                "tau_ci",
                "tau_own",
                "tau_total",
                "sigma",
                "tokens_per_s",
                "identical",
                "ttft_ms",
                "n",
                "drafter_visual_tokens",
                "draft_kv",
                "per_task",
            } <= set(r)
            assert r["n"] == 4 and r["tau"] > 0 and r["sigma"] >= 1.0 and r["tokens_per_s"] > 0
            assert r["tau_ci"][0] <= r["tau"] <= r["tau_ci"][1] and r["tau_own"] > 0
            assert not r.get("errors"), r.get("errors")
        assert report["results"][m]["0.0"]["identical"] == 1.0, m
        assert report["results"][m]["1.0"]["identical"] is None
    assert report["results"]["ar"]["0.0"]["sigma"] == 1.0 and report["results"]["ar"]["0.0"]["tau"] == 1.0
    spec, eagle = report["results"]["specvlm"]["0.0"], report["results"]["eaglevlm"]["0.0"]
    assert spec["drafter_visual_tokens"] <= eagle["drafter_visual_tokens"]
    assert all(r.get("assistant_saw_image") for r in report["runs"] if r["method"] == "assisted")
    for m in spec_methods:  # the per-phase breakdown adds up to the measured wall time
        b = report["results"][m]["0.0"]["breakdown"]
        assert b["rounds"] >= 4 and b["round_ms"] > 0 and b["ar_step_ms"] > 0 and b["tree_nodes_per_round"] >= 1
        assert 0 <= b["tree_depth_per_round"] <= 4
        assert sum(b["share"].values()) == pytest.approx(1.0, abs=0.01)
        assert b["round_ms"] == pytest.approx(
            b["draft_ms_per_round"] + b["verify_ms_per_round"] + b["other_ms_per_round"], abs=0.05
        )
    assert "breakdown" not in report["results"]["ar"]["0.0"]
    assert "| method |" in (run_dir / "bench.md").read_text()
    assert "Where the time goes" in (run_dir / "bench.md").read_text()
    assert (run_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_rejects_bad_options_before_model_work(setup, tmp_path):
    out = cli("mode=bench", f"target={setup['target']}", "bench.methods=[ar,medusa]", f"hydra.run.dir={tmp_path / 'b'}")
    assert_one_line_error(out, "bench.methods")


def test_bench_assistant_auto_uses_the_embedded_assistant_only_when_built(tmp_path):
    from specvlm_lit.decoding.bench import EMBEDDED_ASSISTANT, settings_from_config

    cfg = {
        "target": str(tmp_path),
        "bench": {"assistant": "auto", "test_urls": str(tmp_path / "t-*.tar"), "corpus_dir": None},
    }
    s = settings_from_config(cfg, str(tmp_path / "out"), tmp_path)
    assert s.assistant is None and s.assistant_auto
    built = tmp_path / EMBEDDED_ASSISTANT
    built.mkdir(parents=True)
    (built / "config.json").write_text("{}")
    assert settings_from_config(cfg, str(tmp_path / "out"), tmp_path).assistant == str(built)
    cfg["bench"]["assistant"] = str(tmp_path / "missing")
    with pytest.raises(Exception, match="does not exist"):
        settings_from_config(cfg, str(tmp_path / "out"), tmp_path)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            {"bench": {"temperatures": [0.0, -1]}},
            "bench.temperatures[1] must be a finite number >= 0 (0 = greedy), got -1",
        ),
        ({"bench": {"resolutions": [64, 0]}}, "bench.resolutions[1] must be an integer >= 1, got 0"),
        ({"bench": {"warmup": -1}}, "bench.warmup must be an integer >= 0, got -1"),
        ({"bench": {"max_new_tokens": True}}, "bench.max_new_tokens must be an integer >= 1, got True"),
        (
            {"bench": {"prompt_lookup_suppress_image_token": "false"}},
            "bench.prompt_lookup_suppress_image_token must be true or false, got 'false'",
        ),
        ({"bench": {"seed": 1}}, "unknown bench option(s) ['seed']"),  # a top-level option, not a bench one
        ({"top_p": 1.5}, "top_p must be a number in (0, 1] (1 = disabled), got 1.5"),
        ({"tree": {"depth": 0}}, "tree.depth must be an integer >= 1, got 0"),
        ({"seed": -1}, "seed must be an integer >= 0 or null, got -1"),
    ],
)
def test_bench_settings_name_the_bad_option_as_typed(tmp_path, override, message):
    from specvlm_lit.decoding.bench import settings_from_config

    cfg = {"target": str(tmp_path), "bench": {"test_urls": "t-*.tar", "assistant": None}}
    cfg = {**cfg, **override, "bench": {**cfg["bench"], **override.get("bench", {})}}
    with pytest.raises(DecodeInputError) as e:
        settings_from_config(cfg, str(tmp_path / "out"), tmp_path)
    assert str(e.value) == message


def test_tree_rules_are_the_same_for_the_dataclass_and_the_cli_check():
    from specvlm_lit.decoding.configs import InvalidOption, TreeConfig
    from specvlm_lit.decoding.pipeline import check_tree

    for bad in ({"top_k": 0}, {"total_tokens": "big"}, {"adaptive": "maybe"}, {"clip_to_budget": 1}):
        with pytest.raises(InvalidOption) as direct:
            TreeConfig(**bad)
        with pytest.raises(DecodeInputError) as checked:
            check_tree(bad)
        assert str(direct.value) == str(checked.value) and str(checked.value).startswith("tree.")
    assert check_tree({"top_k": 4, "total_tokens": "auto"}) == {"top_k": 4, "total_tokens": "auto"}
