"""The committed embedded target: loads like any HF checkpoint, is grounded on seen pairs, and is not trivial.

Its held-out accuracy is not tested here: `python -m recipes.embedded_target.evaluate` reports it (README.md).
"""

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from recipes.embedded_target.evaluate import answer, answer_is_correct
from specvlm_lit.synthetic import CorpusSpec, make_sample
from specvlm_lit.target import TargetAdapter
from tests.conftest import EMBEDDED_TARGET


@pytest.fixture(scope="module")
def target():
    if not (EMBEDDED_TARGET / "config.json").is_file():
        pytest.skip("embedded target not built: python -m recipes.embedded_target.build")
    processor = AutoProcessor.from_pretrained(EMBEDDED_TARGET)
    return TargetAdapter.from_pretrained(EMBEDDED_TARGET), processor


def _test_samples(n, split="test"):
    """Held-out (or, for split="val", seen-pair) samples straight from the generator (no corpus on disk needed)."""
    import io

    from PIL import Image

    spec = CorpusSpec()
    for i in range(n):
        s = make_sample(spec, split, i)
        yield Image.open(io.BytesIO(s["png"])).convert("RGB"), s["json"]


def test_loads_with_plain_from_pretrained():
    if not (EMBEDDED_TARGET / "config.json").is_file():
        pytest.skip("embedded target not built")
    model = LlavaForConditionalGeneration.from_pretrained(EMBEDDED_TARGET)
    assert model.dtype == torch.float32  # stored bf16, upcast on load (config dtype float32)
    n = sum(p.numel() for p in model.parameters())
    assert 5e6 < n < 60e6
    tok = AutoTokenizer.from_pretrained(EMBEDDED_TARGET)
    assert tok.image_token_id == model.config.image_token_id and tok.chat_template


def test_answers_on_seen_pairs_are_grounded(target):
    """v2 answers 74% of val samples (seen colour+shape pairs) right; v1, with no stage 1, was not grounded."""
    adapter, processor = target
    results = [
        answer_is_correct(
            answer(adapter, processor, img, rec["conversations"][0]["value"], 128),
            rec["checks"][0],
            rec["tasks"][0],
            rec["scene"],
        )
        for img, rec in _test_samples(24, "val")
    ]
    assert sum(results) / len(results) >= 0.5, results


def test_answers_depend_on_the_image(target):
    adapter, processor = target
    q = "Describe the image in detail."
    answers = {answer(adapter, processor, img, q, 96) for img, _ in _test_samples(6)}
    assert len(answers) == 6


def test_sampling_at_t1_gives_varied_text(target):
    adapter, processor = target
    img, rec = next(_test_samples(1))
    q = "Describe the image in detail."
    torch.manual_seed(0)
    samples = {answer(adapter, processor, img, q, 64, temperature=1.0) for _ in range(6)}
    assert len(samples) >= 3
