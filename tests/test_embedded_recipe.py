"""The target recipe end to end on a tiny model (Hydra compose, a few steps): builds, saves, loads, evaluates."""

import json

import pytest
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from specvlm_lit.embedded.evaluate import answer_is_correct
from specvlm_lit.target import TargetAdapter
from tests.conftest import build_tiny_target


@pytest.fixture(scope="module")
def tiny_build(small_corpus, tmp_path_factory):
    # small_corpus was generated with samples_per_shard=50; the recipe must reuse, not regenerate, it.
    out = tmp_path_factory.mktemp("target") / "tiny_target"
    return out, build_tiny_target(small_corpus, out)


def test_recipe_builds_a_loadable_target(tiny_build):
    out, report = tiny_build
    assert report["steps"] == 3 and report["heldout_eval"]["samples"] == 2
    for name in ("config.json", "model.safetensors", "processor_config.json", "build_report.json"):
        assert (out / name).is_file(), name
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
    processor = AutoProcessor.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    TargetAdapter.from_pretrained(out).check_tokenizer(processor.tokenizer)
    assert json.loads((out / "build_report.json").read_text())["parameters"] == sum(p.numel() for p in model.parameters())


def test_answer_checker():
    scene = {"objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]}
    ok = "The image shows two shapes on a black background. There is a small red circle at the top. A large blue square sits on the left."
    assert answer_is_correct(ok, ["two", "red circle", "blue square"], "describe", scene)
    assert not answer_is_correct(ok.replace("blue square", "green square"), ["two", "red circle", "blue square"], "describe", scene)
    hallucinated = ok + " There is a pink cross on the right."
    assert not answer_is_correct(hallucinated, ["two", "red circle", "blue square"], "describe", scene)
    assert answer_is_correct("Yes, there is a small red circle.", ["Yes"], "attribute", scene)
    assert not answer_is_correct("No, there is none.", ["Yes"], "attribute", scene)
    assert not answer_is_correct("There are twenty circles.", ["two"], "count", scene)
