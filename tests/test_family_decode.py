"""decode.py's pipeline end to end on tiny checkpoints of the new families (Qwen2.5-VL: mRoPE; LLaVA-NeXT: AnyRes;
Mistral 3: rows of image tokens with break tokens).

The reference is Hugging Face's own path: the family's processor class on the rendered prompt text and the image,
then ``model.generate()``. The drafter is an EAGLE-2 drafter built with the registry's ``for_target`` and exported
with ``save_atomically`` (what ``train.py`` writes), so the test covers loading it by path too; its random weights
reject almost every draft, which exercises the reject paths (accept paths: tests/test_families.py's oracle tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specvlm_lit.decoding.pipeline import DecodeInputError, SpecVLMPipeline
from specvlm_lit.drafter.base import drafter_class, save_atomically
from tests.families.build import build_family
from tests.families.reference import hf_processor, image, text_kwargs

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_5_vl", "llava_next", "mistral3")
TREE = {"top_k": 4, "depth": 3, "total_tokens": 10}
QUESTION = "What is shown in the image?"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (target dir, exported EAGLE-2 drafter dir, two test images of different sizes / aspect ratios)."""
    root = tmp_path_factory.mktemp("family_decode")
    out = {}
    for i, family in enumerate(FAMILIES):
        target = build_family(family, root / family, seed=i)
        adapter = SpecVLMPipeline(target).adapter
        torch.manual_seed(0)
        drafter = root / f"{family}_drafter"
        save_atomically(drafter_class("eagle_vlm").for_target(adapter), drafter)
        images = []
        for j, (w, h) in enumerate(((50, 40), (120, 36))):
            path = root / f"{family}_{w}x{h}.png"
            image(w, h, seed=10 + j).save(path)
            images.append(path)
        out[family] = (target, drafter, images)
    return out


def hf_reference(pipe: SpecVLMPipeline, family: str, target: Path, image_path: Path, n: int) -> list[int]:
    """HF processor outputs for the adapter's rendered prompt text + ``model.generate()`` (greedy)."""
    from PIL import Image

    proc = pipe.adapter.processor
    img = Image.open(image_path).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = proc.render(messages, [img]).text
    ref = hf_processor(family, target, proc.tokenizer, proc.image_processor)(
        text=[text], images=[[img]], return_tensors="pt", **text_kwargs(proc.tokenizer, text)
    )
    out = pipe.adapter.model.generate(**ref, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    prepared = pipe.prepare(image_path, QUESTION)
    assert torch.equal(prepared.input_ids, ref["input_ids"]), "pipeline prompt != HF processor prompt"
    return out[0, ref["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_greedy_with_drafter_equals_hf_generate(exported, family):
    target, drafter, images = exported[family]
    pipe = SpecVLMPipeline(target, drafter, tree=TREE)
    pipe.eos_token_id = None  # run the full length: random tiny models emit EOS at arbitrary points
    n = 12
    answers = set()
    for path in images:
        expected = hf_reference(pipe, family, target, path, n)
        spec = pipe.generate(path, QUESTION, max_new_tokens=n)
        ar = pipe.generate_ar(path, QUESTION, max_new_tokens=n)
        assert spec.tokens == expected, (family, path.name)
        assert ar.tokens == expected, (family, path.name)
        assert spec.method == "eaglevlm" and spec.stats.target_visual_tokens == pipe.prepare(path, QUESTION).n_visual
        answers.add(tuple(expected))
    assert len(answers) == len(images)  # the answers depend on the image (not one repeated token)


def test_pipeline_bad_image_is_a_decode_input_error(exported):
    target, _, _ = exported["qwen2_5_vl"]
    pipe = SpecVLMPipeline(target)
    from PIL import Image

    with pytest.raises(DecodeInputError, match="too small"):
        pipe.prepare(Image.new("RGB", (4, 4)), QUESTION)


def test_decode_cli_on_a_qwen_target_with_a_drafter(exported, tmp_path):
    target, drafter, images = exported["qwen2_5_vl"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        str(ROOT / "decode.py"),
        f"target={target}",
        f"drafter={drafter}",
        f"image={images[0]}",
        f"prompt={QUESTION}",
        "max_new_tokens=6",
        "tree.top_k=4",
        "tree.depth=3",
        "tree.total_tokens=10",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "method: eaglevlm" in res.stdout and f"drafter: {drafter} (eaglevlm)" in res.stdout, res.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_hf_batched_row_equals_each_prompt_alone(exported, family):
    """The benchmark's HF-batched baseline hands HF the family's own inputs (Qwen: processor outputs and
    mm_token_type_ids for mRoPE), so each left-padded row equals that prompt's plain greedy decode."""
    from specvlm_lit.decoding.bench.batch import run_hf_batched

    target, _, images = exported[family]
    pipe = SpecVLMPipeline(target)
    pipe.eos_token_id = None
    n = 8
    group = [pipe.prepare(path, QUESTION) for path in images]
    assert group[0].prompt_len != group[1].prompt_len  # the shorter prompt is really left-padded
    rows, _ = run_hf_batched(pipe, group, n)
    assert rows == [pipe.generate_ar(path, QUESTION, max_new_tokens=n).tokens for path in images]


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_spec_batched_row_equals_each_prompt_alone(exported, family):
    """BatchedSpeculativeDecoder over left-padded prompts of different image sizes (Qwen: per-row mRoPE positions
    of each row's own images; LLaVA-NeXT: AnyRes tiles of different counts): each row equals HF ``generate()`` of
    that prompt alone."""
    from specvlm_lit.decoding.batched import BatchedSpeculativeDecoder
    from specvlm_lit.decoding.bench.batch import run_spec_batched
    from specvlm_lit.decoding.configs import TreeConfig

    target, drafter, images = exported[family]
    pipe = SpecVLMPipeline(target, drafter, tree=TREE)
    pipe.eos_token_id = None
    n = 8
    group = [pipe.prepare(path, QUESTION) for path in images]
    decoder = BatchedSpeculativeDecoder(pipe.adapter, pipe.drafter, TreeConfig(**TREE))
    rows, _, _ = run_spec_batched(decoder, pipe, group, n)
    assert rows == [hf_reference(pipe, family, target, path, n) for path in images]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_accept_paths_equal_each_prompt_alone(exported, family):
    """The same batch with a drafter that accepts often (tests/test_batched.py's oracle: the target's own
    continuation per request, with injected mistakes), so multi-token accepts, per-row compaction of different
    accept lengths and rows finishing at different rounds all run on the family's layout and positions."""
    from specvlm_lit.decoding.batched import BatchedSpeculativeDecoder
    from specvlm_lit.decoding.configs import TreeConfig
    from tests.test_batched import BatchOracle

    target, _, images = exported[family]
    pipe = SpecVLMPipeline(target, None, tree=TREE)
    ad = pipe.adapter
    n = 24
    group = [pipe.prepare(path, QUESTION) for path in images]
    requests = [(inp.input_ids, ad.encode_images(inp.pixel_values)) for inp in group]
    decoder = BatchedSpeculativeDecoder(ad, BatchOracle(ad, requests, noise=0.2), TreeConfig(**TREE))
    res = decoder.generate(
        [inp.input_ids for inp in group],
        pixel_values=[inp.pixel_values for inp in group],
        max_new_tokens=n,
        image_layouts=[inp.layouts for inp in group],
    )
    assert [t.tolist() for t in res.tokens] == [hf_reference(pipe, family, target, path, n) for path in images]
    assert min(res.stats.sigma) > 2, res.stats.sigma


def test_mrope_deltas_follow_the_cache_rows(exported):
    """Qwen's per-row mRoPE deltas live on the KV cache: dropping a finished row keeps the others' deltas (the bug
    the accept-often batch test found: a 2-row delta broadcast a 1-row forward to 2 rows), and a plain cache whose
    rows were selected without them is refused with the reason instead of broadcasting."""
    from transformers import DynamicCache

    from specvlm_lit.targets.inputs import EncodedImages
    from specvlm_lit.targets.qwen_vl import MRopeCache, rope_deltas

    target, _, images = exported["qwen2_5_vl"]
    pipe = SpecVLMPipeline(target, None, tree=TREE)
    ad = pipe.adapter
    group = [pipe.prepare(path, QUESTION) for path in images]
    assert isinstance(ad.new_cache(), MRopeCache)
    width = max(inp.prompt_len for inp in group)
    ids = torch.zeros(2, width, dtype=torch.long)
    pos = torch.zeros(2, width, dtype=torch.long)
    for b, inp in enumerate(group):
        ids[b, width - inp.prompt_len :] = inp.input_ids[0]
        pos[b, width - inp.prompt_len :] = torch.arange(inp.prompt_len)
    feats = EncodedImages.join([ad.encode_images(inp.pixel_values) for inp in group])
    for cache in (ad.new_cache(), DynamicCache()):
        ad.forward(ids, image_features=feats, position_ids=pos, past_key_values=cache, use_cache=True)
        both = rope_deltas(cache).clone()
        assert both[0] != both[1]  # the two images' grids give the rows different deltas
        cache.batch_select_indices(torch.tensor([1]))
        nxt = torch.tensor([[5]])
        if isinstance(cache, MRopeCache):
            assert torch.equal(rope_deltas(cache), both[1:])
            assert ad.forward(nxt, past_key_values=cache, use_cache=True).logits.shape[0] == 1
        else:
            with pytest.raises(ValueError, match="mRoPE deltas of 2 rows"):
                ad.forward(nxt, past_key_values=cache, use_cache=True)


def test_drafter_of_an_mrope_target_has_a_1d_rotary(exported):
    """The drafter's positions are 1-D (docs/training.md): its exported rotary config keeps the target's theta and
    leaves out Qwen's multimodal sections, which its Llama rotary would not read."""
    import json

    target, drafter, _ = exported["qwen2_5_vl"]
    target_rope = json.loads((target / "config.json").read_text())["text_config"]["rope_parameters"]
    assert "mrope_section" in target_rope
    rope = json.loads((drafter / "config.json").read_text())["rope_parameters"]
    assert not [k for k in rope if k.startswith("mrope")]
    assert rope["rope_theta"] == target_rope["rope_theta"]
