"""Family adapters (specvlm_lit.targets) against the real Hugging Face classes, one tiny checkpoint per family.

References are always Hugging Face's own code: the family's processor class for the prompt and its outputs, the
model's ``forward`` on the processor outputs (HF computes Qwen's mRoPE positions itself from
``mm_token_type_ids``) and ``generate()``. Checkpoints are built once per test session (tests/families/build.py).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from specvlm_lit import kv_cache
from specvlm_lit.decoding.acceptance import WarpConfig
from specvlm_lit.decoding.configs import TreeConfig
from specvlm_lit.decoding.speculative import SpeculativeDecoder
from specvlm_lit.target import TargetAdapter, TargetLoadError
from specvlm_lit.targets import (
    FamilyProcessor,
    ImageTooSmallError,
    PromptError,
    VideoUnsupportedError,
    VisualInputs,
)
from specvlm_lit.targets.processor import _torchvision_available
from tests.families.build import FAMILIES, build_family
from tests.families.reference import IMAGE_SIZES, hf_processor, image, text_kwargs
from tests.helpers import root_path, tree_from_parents

ATOL = 1e-4  # logits are O(10) at the raised init scale; float32 reorderings differ by ~2e-5
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build_family(family, root / family) for family in FAMILIES}


class Family:
    """One family's adapter (loaded through TargetAdapter.from_pretrained) and HF's processor for it."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        self.adapter = TargetAdapter.from_pretrained(path)
        proc = self.adapter.processor
        self.hf = hf_processor(name, path, proc.tokenizer, proc.image_processor)

    def case(self, messages, images):
        """(adapter's prompt, HF processor outputs for the same rendered text and images)."""
        prompt = self.adapter.render_prompt(messages, images)
        kwargs = text_kwargs(self.adapter.processor.tokenizer, prompt.text)
        ref = self.hf(text=[prompt.text], images=[images], return_tensors="pt", **kwargs)
        return prompt, ref

    def text_ids(self, n: int, seed: int) -> torch.Tensor:
        """``[1, n]`` ordinary text tokens (no special / image tokens)."""
        tok = self.adapter.processor.tokenizer
        special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
        allowed = torch.tensor([i for i in range(len(tok)) if i not in special])
        g = torch.Generator().manual_seed(seed)
        return allowed[torch.randint(0, len(allowed), (1, n), generator=g)]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, family_dirs) -> Family:
    return Family(request.param, family_dirs[request.param])


def single(width, height, seed=0, question="What is shown in the image?"):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], [
        image(width, height, seed)
    ]


def multi_turn(width=64, height=48, seed=5):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square on a blue background."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many objects are there?"}]},
    ]
    return messages, [image(width, height, seed)]


def two_images():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "Compare both images and answer briefly."},
            ],
        }
    ]
    return messages, [image(40, 90, 7), image(120, 36, 8)]


def cases():
    return [single(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SIZES)] + [multi_turn(), two_images()]


def hf_generate(fam: Family, ref, n: int) -> list[int]:
    out = fam.adapter.model.generate(**ref, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ref["input_ids"].shape[1] :].tolist()


def with_text(ref, extra: torch.Tensor) -> dict:
    """HF processor outputs with text tokens ``extra [1, k]`` appended (mask and token types extended)."""
    out = {**ref, "input_ids": torch.cat([ref["input_ids"], extra], 1)}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in ref:
        out["mm_token_type_ids"] = torch.cat([ref["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    return out


def hf_logits(fam: Family, ref, extra: torch.Tensor) -> torch.Tensor:
    """HF forward over the processor outputs with text tokens ``extra [1, k]`` appended."""
    return fam.adapter.model(**with_text(ref, extra)).logits


# ------------------------------------------------------------------------------------------- prompt building
def test_prompt_and_processor_outputs_equal_hf_processor(fam):
    ad = fam.adapter
    for messages, images in cases():
        prompt, ref = fam.case(messages, images)
        assert torch.equal(prompt.input_ids, ref["input_ids"])
        for name, value in prompt.visual.hf_kwargs().items():
            torch.testing.assert_close(value, ref[name], atol=0, rtol=0, msg=name)
        if "mm_token_type_ids" in ref:
            assert torch.equal(ad.mm_token_type_ids(prompt.input_ids), ref["mm_token_type_ids"].to(torch.int32))
        n_visual_tokens = int(ad.visual_token_mask(prompt.input_ids).sum())  # the runs the layouts describe
        assert sum(layout.num_tokens for layout in prompt.layouts) == n_visual_tokens
        if len(images) == 1:  # counts from the pixel size alone agree with the processor's expansion
            width, height = images[0].size
            assert ad.num_visual_tokens(height, width) == prompt.layouts[0].num_tokens
    # The rendered text is the checkpoint's own format ([INST] templates have no generation prompt).
    text = ad.render_prompt(*single(50, 40)).text
    inst = ("llava_next", "mistral3")
    assert ("<|im_start|>assistant\n" in text) if fam.name not in inst else text.endswith("[/INST]")


def test_prompt_equals_hf_apply_chat_template(fam):
    """The prompt equals HF's own chat path, ``processor.apply_chat_template(tokenize=True)``, images given in the
    messages: a template that writes BOS itself (Mistral 3, whose tokenizer also prepends one) gets exactly one."""
    from PIL import Image

    messages, images = single(50, 40)
    prompt = fam.adapter.render_prompt(messages, images)
    chat = [{"role": "user", "content": [{"type": "image", "image": images[0]}, messages[0]["content"][1]]}]
    assert isinstance(images[0], Image.Image)
    hf = fam.hf
    hf.chat_template = hf.chat_template or fam.adapter.processor.chat_template  # the checkpoint's template
    ref = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert prompt.input_ids.tolist() == ref["input_ids"].tolist()
    bos = fam.adapter.processor.tokenizer.bos_token_id
    if bos is not None:
        assert prompt.input_ids[0].tolist().count(bos) <= 1


def test_layouts(fam):
    ad = fam.adapter
    prompt = ad.render_prompt(*single(120, 36))
    (layout,) = prompt.layouts
    if fam.name in QWEN:  # one merged grid, as wide as the image is
        kind, rows, cols = layout.segments[0]
        assert kind == "merged" and cols > rows and layout.grid == (rows, cols)
    elif fam.name == "mistral3":  # the [IMG] grid, each row ended by [IMG_BREAK] (the last by [IMG_END])
        ((kind, rows, cols),) = layout.segments
        assert kind == "tiles" and cols > rows and layout.grid is None
        run = prompt.input_ids[0][ad.visual_token_mask(prompt.input_ids)[0]]
        assert bool((run[torch.cat([p.index for p in layout.pieces()])] == ad.image_token_id).all())
        breaks = ad.processor.tokenizer.convert_ids_to_tokens(run[layout.extra_indices()].tolist())
        assert breaks == ["[IMG_BREAK]"] * (rows - 1) + ["[IMG_END]"]
    else:  # base tile grid + unpadded tiles with a newline per row: not a plain grid
        assert [s[0] for s in layout.segments] == ["grid", "tiles"] and layout.grid is None
        _, rows, cols = layout.segments[1]
        assert cols > rows
    # encode_images gives one feature row per token of each visual's run, in the layout's order
    both = ad.render_prompt(*two_images())
    assert [f.shape[0] for f in ad.encode_images(both.visual)] == [lay.num_tokens for lay in both.layouts]


def test_conversation_loss_mask_is_assistant_only(fam):
    ad = fam.adapter
    answers = ["A red square on a blue background.", "There are two cats and one dog."]
    messages, images = multi_turn()
    messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answers[1]}]}]
    conv = ad.render_conversation(messages, images)
    ids, mask = conv.input_ids[0], conv.loss_mask[0]
    assert ids.shape == mask.shape and not bool(mask[ids == ad.image_token_id].any())
    tok = ad.processor.tokenizer
    runs, current = [], []
    for token, learn in zip(ids.tolist(), mask.tolist()):
        if learn:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    decoded = [tok.decode(run) for run in runs]
    assert len(decoded) == 2, decoded
    for text, answer in zip(decoded, answers):
        assert text.strip().startswith(answer) and tok.eos_token in text, (text, answer)
    # The prompt part is the decoding prompt of the dialogue before the last answer, except where the checkpoint's
    # own template renders the assistant header unlike its generation prompt (OneVision: "assistant " + "\n").
    prompt = ad.render_prompt(messages[:-1], images)
    if fam.name == "llava_onevision":
        assert prompt.text.endswith("<|im_start|>assistant\n") and "<|im_start|>assistant \n" in conv.text
    else:
        assert torch.equal(ids[: prompt.input_ids.shape[1]], prompt.input_ids[0])
    with pytest.raises(PromptError, match="no assistant turn"):
        ad.render_conversation(messages[:1], images)


# ------------------------------------------------------------------------------------------------- forward
def test_forward_equals_hf_model_on_processor_outputs(fam):
    ad = fam.adapter
    for messages, images in cases():
        prompt, ref = fam.case(messages, images)
        expected = ad.model(**ref).logits
        out = ad.forward(prompt.input_ids, pixel_values=prompt.visual)
        torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)
    # A text-only prompt (plain positions for every family).
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Where is the ball?"}]}]
    plain = ad.render_prompt(text_only)
    assert plain.visual is None
    ref = fam.hf(text=[plain.text], return_tensors="pt", **text_kwargs(fam.adapter.processor.tokenizer, plain.text))
    assert torch.equal(plain.input_ids, ref["input_ids"])
    torch.testing.assert_close(ad.forward(plain.input_ids).logits, ad.model(**ref).logits, atol=ATOL, rtol=0)
    # Pre-encoded images, logits_to_keep and the hidden -> LM head contract.
    feats = ad.encode_images(prompt.visual)
    last = ad.forward(prompt.input_ids, image_features=feats, logits_to_keep=1)
    torch.testing.assert_close(last.logits[:, 0], expected[:, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(ad.lm_head(last.hidden[:, -1]), expected[:, -1], atol=ATOL, rtol=0)


def test_right_padded_batch_equals_hf_batch(fam):
    """A training-style batch (two prompts, images of different sizes, right padding) = HF's processor batch."""
    ad = fam.adapter
    samples = [single(40, 90, seed=1), multi_turn()]
    prompts = [ad.render_prompt(m, i) for m, i in samples]
    width = max(p.input_ids.shape[1] for p in prompts)
    pad = ad.processor.tokenizer.pad_token_id
    ids = torch.full((2, width), pad, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : p.input_ids.shape[1]], mask[row, : p.input_ids.shape[1]] = p.input_ids[0], 1
    visual = VisualInputs.concat([p.visual for p in prompts])
    kwargs = text_kwargs(fam.adapter.processor.tokenizer, prompts[0].text)
    ref = fam.hf(
        text=[p.text for p in prompts], images=[i for _, i in samples], padding=True, return_tensors="pt", **kwargs
    )
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    for name, value in visual.hf_kwargs().items():
        torch.testing.assert_close(value, ref[name], atol=0, rtol=0, msg=name)
    out = ad.forward(ids, attention_mask=mask, pixel_values=visual)
    expected = ad.model(**ref).logits
    for row, p in enumerate(prompts):
        n = p.input_ids.shape[1]
        torch.testing.assert_close(out.logits[row, :n], expected[row, :n], atol=ATOL, rtol=0)
        alone = ad.forward(p.input_ids, pixel_values=p.visual).logits[0]
        torch.testing.assert_close(out.logits[row, :n], alone, atol=ATOL, rtol=0)


def test_hidden_layers_equal_hf_hidden_states(fam):
    """The issue-16 hook contract holds for every family: layer ids = HF's output_hidden_states indices."""
    ad = fam.adapter
    prompt, ref = fam.case(*multi_turn())
    expected = ad.model(**ref, output_hidden_states=True).hidden_states
    layers = tuple(range(ad.num_layers))
    out = ad.forward(prompt.input_ids, pixel_values=prompt.visual, hidden_layers=layers)
    for i, got in zip(layers, out.layer_hidden):
        torch.testing.assert_close(got, expected[i], atol=ATOL, rtol=0)
    cache = ad.new_cache()
    ad.forward(prompt.input_ids, pixel_values=prompt.visual, past_key_values=cache, use_cache=True)
    p = prompt.input_ids.shape[1]
    tokens = fam.text_ids(3, seed=4)
    tree = ad.tree_forward(tokens, torch.arange(p, p + 3)[None], torch.ones(3, 3).tril().bool(), cache, layers)
    full = ad.model(**with_text(ref, tokens), output_hidden_states=True).hidden_states
    for i, got in zip(layers, tree.layer_hidden):
        torch.testing.assert_close(got, full[i][:, p:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_positions_are_mrope_not_1d(family, family_dirs):
    """The trap the adapter avoids: without mm_token_type_ids Qwen2.5-VL silently uses 1-D positions (Qwen2-VL and
    Qwen3-VL raise); the adapter derives the types from the ids itself."""
    fam = Family(family, family_dirs[family])
    prompt, ref = fam.case(*single(64, 64))
    with_types = fam.adapter.model(**ref).logits
    without = {k: v for k, v in ref.items() if k != "mm_token_type_ids"}
    if family == "qwen2_5_vl":
        assert (fam.adapter.model(**without).logits - with_types).abs().max() > 1e-3
    else:
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            fam.adapter.model(**without)
    positions, deltas = fam.adapter.prompt_position_ids(prompt.input_ids, prompt.visual.image_grid_thw)
    assert positions.shape == (3, 1, prompt.input_ids.shape[1]) and int(deltas) < 0


def test_cached_greedy_equals_hf_generate_and_depends_on_image(fam):
    ad = fam.adapter
    n = 10
    answers = []
    for messages, images in cases()[:3] + [multi_turn()]:
        prompt, ref = fam.case(messages, images)
        expected = hf_generate(fam, ref, n)
        cache = ad.new_cache()
        out = ad.forward(prompt.input_ids, pixel_values=prompt.visual, past_key_values=cache, use_cache=True)
        got = []
        for _ in range(n):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            got.append(int(token))
            out = ad.forward(token, past_key_values=cache, use_cache=True)
        assert got == expected
        answers.append(tuple(got))
    # Raised init scale: answers are not one repeated token, and they follow the image's content, not only its
    # token count: same-size images with different pixels get three different answers.
    assert max(len(set(a)) for a in answers) >= 3, answers
    same_size = {tuple(hf_generate(fam, fam.case(*single(50, 40, seed=s))[1], 6)) for s in range(3)}
    assert len(same_size) == 3, same_size


# -------------------------------------------------------------------------------------------- verification
CHAIN = [-1, 0, 1, 2, 3]
BRANCHING = [-1, 0, 0, 1, 2, 2, 3, 5]


def _prefilled(fam, messages, images):
    prompt, ref = fam.case(messages, images)
    cache = fam.adapter.new_cache()
    fam.adapter.forward(prompt.input_ids, pixel_values=prompt.visual, past_key_values=cache, use_cache=True)
    return prompt, ref, cache


@pytest.mark.parametrize("parents", [CHAIN, BRANCHING], ids=["chain", "branching"])
def test_tree_forward_equals_hf_on_every_path(fam, parents):
    """Every node's logits = HF's full forward over prompt + its root-to-node path (positions, mRoPE included,
    computed by HF itself); on a chain also = sequential cached forwards."""
    ad = fam.adapter
    prompt, ref, cache = _prefilled(fam, *multi_turn())
    p = prompt.input_ids.shape[1]
    mask, depth = tree_from_parents(parents)
    tokens = fam.text_ids(len(parents), seed=len(parents))
    tree = ad.tree_forward(tokens, (p + depth)[None], mask, cache)
    assert cache.get_seq_length() == p + len(parents)
    for node in range(len(parents)):
        path = tokens[:, root_path(parents, node)]
        torch.testing.assert_close(tree.logits[0, node], hf_logits(fam, ref, path)[0, -1], atol=ATOL, rtol=0)
    if parents == CHAIN:
        _, _, seq_cache = _prefilled(fam, *multi_turn())
        for i in range(len(parents)):
            step = ad.forward(tokens[:, i : i + 1], past_key_values=seq_cache, use_cache=True)
            torch.testing.assert_close(tree.logits[0, i], step.logits[0, -1], atol=ATOL, rtol=0)


def test_compaction_after_partial_accept_is_exact(fam):
    ad = fam.adapter
    messages, images = single(40, 90, seed=3)
    prompt, ref, cache = _prefilled(fam, messages, images)
    p = prompt.input_ids.shape[1]
    mask, depth = tree_from_parents(BRANCHING)
    tokens = fam.text_ids(len(BRANCHING), seed=21)
    ad.tree_forward(tokens, (p + depth)[None], mask, cache)
    path = root_path(BRANCHING, 7)  # [0, 2, 5, 7]: a partial accept through second-ranked siblings
    kv_cache.compact(cache, p, torch.tensor(path))
    assert cache.get_seq_length() == p + len(path)
    fresh = ad.new_cache()
    ad.forward(
        torch.cat([prompt.input_ids, tokens[:, path]], 1),
        pixel_values=prompt.visual,
        past_key_values=fresh,
        use_cache=True,
    )
    for got, want in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)
    # Decoding continues identically from the compacted cache (the mRoPE delta survived compaction).
    nxt = fam.text_ids(2, seed=22)
    a = ad.forward(nxt, past_key_values=cache, use_cache=True).logits
    b = ad.forward(nxt, past_key_values=fresh, use_cache=True).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    expected = hf_logits(fam, ref, torch.cat([tokens[:, path], nxt], 1))[:, -2:]
    torch.testing.assert_close(a, expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------- speculative decoding
@pytest.mark.parametrize("noise", [0.0, 0.3], ids=["oracle", "noisy_oracle"])
def test_speculative_greedy_equals_hf_generate(fam, noise):
    """The existing SpeculativeDecoder, unchanged, over every family: token-identical to HF generate(), with a
    drafter that accepts often (the target's own continuation, with injected mistakes when noisy)."""
    from tests.test_speculative import OracleDrafter

    ad = fam.adapter
    n = 24
    sigmas = []
    for messages, images in [single(50, 40, seed=0), single(40, 90, seed=1), multi_turn()]:
        prompt, ref = fam.case(messages, images)
        expected = hf_generate(fam, ref, n)
        feats = ad.encode_images(prompt.visual)
        drafter = OracleDrafter(ad, prompt.input_ids, feats, noise=noise)
        dec = SpeculativeDecoder(ad, drafter, TreeConfig(4, 4, 16), WarpConfig())
        res = dec.generate(prompt.input_ids, feats, max_new_tokens=n, eos_token_id=None)
        assert res.tokens.tolist() == expected
        sigmas.append(res.stats.sigma)
    assert min(sigmas) > 2, sigmas


# ------------------------------------------------------------------------------------------------ bad input
def test_unsupported_model_type_is_one_line(family_dirs, tmp_path):
    bad = tmp_path / "gemma"
    shutil.copytree(family_dirs["qwen2_vl"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "gemma3"
    (bad / "config.json").write_text(json.dumps(config))
    for load in (TargetAdapter.from_pretrained, FamilyProcessor.load):
        with pytest.raises(TargetLoadError) as e:
            load(bad)
        msg = str(e.value)
        assert "\n" not in msg and "gemma3" in msg
        assert all(f in msg for f in ("llava", "llava_next", "qwen2_5_vl", "qwen3_vl"))


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_processor_disagreeing_with_model_names_both_values(family, family_dirs):
    path = family_dirs[family]
    proc = FamilyProcessor.load(path)
    config = AutoConfig.from_pretrained(path)
    config.image_token_id = proc.image_token_id + 1
    both = rf"id {proc.image_token_id}\b.*image_token_id is {config.image_token_id}"
    with pytest.raises(TargetLoadError, match=both):
        FamilyProcessor(proc.adapter_cls, config, proc.tokenizer, proc.image_processor, proc.chat_template)
    config = AutoConfig.from_pretrained(path)
    config.get_text_config().vocab_size = len(proc.tokenizer) - 10
    with pytest.raises(TargetLoadError, match=rf"{len(proc.tokenizer)} tokens.*only {len(proc.tokenizer) - 10}"):
        FamilyProcessor(proc.adapter_cls, config, proc.tokenizer, proc.image_processor, proc.chat_template)


def _video_messages(video=None):
    item = {"type": "video"} if video is None else {"type": "video", "video": video}
    return [{"role": "user", "content": [item, {"type": "text", "text": "What happens?"}]}]


def test_video_errors(family_dirs):
    for image_only in ("llava_next", "mistral3"):
        with pytest.raises(VideoUnsupportedError, match=f"{image_only} targets take images only"):
            FamilyProcessor.load(family_dirs[image_only]).render(_video_messages())
    qwen = FamilyProcessor.load(family_dirs["qwen2_5_vl"])
    with pytest.raises(PromptError, match="1 video placeholder.*0 video"):
        qwen.render(_video_messages())
    if _torchvision_available():
        pytest.skip("torchvision is installed: the missing-torchvision error cannot occur")
    raw = np.zeros((4, 32, 32, 3), dtype=np.uint8)  # frames: they need the HF video processor
    with pytest.raises(VideoUnsupportedError, match="torchvision"):
        qwen.render(_video_messages(raw))


@pytest.mark.parametrize(
    "family,size", [("qwen2_5_vl", (10, 40)), ("llava_next", (4, 60)), ("qwen3_vl", (2000, 9)), ("mistral3", (2000, 9))]
)
def test_image_too_small_for_processor(family, size, family_dirs):
    proc = FamilyProcessor.load(family_dirs[family])
    with pytest.raises(ImageTooSmallError, match="too small"):
        proc.render(*single(*size))


def test_bare_pixels_and_placeholder_mismatch_are_clear(family_dirs):
    ad = TargetAdapter.from_pretrained(family_dirs["llava_next"])
    with pytest.raises(ValueError, match="VisualInputs"):
        ad.encode_images(torch.zeros(1, 3, 32, 32))
    messages, images = single(50, 40)
    with pytest.raises(PromptError, match="1 image placeholder.*2 image"):
        ad.render_prompt(messages, images + images)
    assert isinstance(ad.render_prompt(messages, images).visual, VisualInputs)


# ------------------------------------------------------------------------------------------ sampling (slow)
@pytest.mark.slow
def test_sampling_law_on_an_mrope_family(family_dirs):
    """Speculative sampling over Qwen2.5-VL (mRoPE positions through tree verification) emits the first 3 / 4
    tokens with exactly the target's law (chi-square, as tests/test_sampling_law.py does for LLaVA)."""
    from collections import Counter

    from specvlm_lit.decoding.acceptance import warp_logits
    from tests.test_sampling_law import ALPHA, law_pvalue, marginal
    from tests.test_speculative import OracleDrafter

    fam = Family("qwen2_5_vl", family_dirs["qwen2_5_vl"])
    ad = fam.adapter
    prompt = ad.render_prompt(*single(50, 40, seed=2))
    ids, feats = prompt.input_ids, ad.encode_images(prompt.visual)
    cfg = WarpConfig(1.0, top_k=3)
    law = {(): 1.0}
    for _ in range(4):
        nxt = {}
        for s, p in law.items():
            full = torch.cat([ids, torch.tensor([s], dtype=torch.long).reshape(1, -1)], 1)
            row = warp_logits(ad.forward(full, image_features=feats).logits[0, -1], cfg).double()
            nxt.update({s + (x,): p * q for x, q in enumerate((row / row.sum()).tolist()) if q > 0})
        law = nxt
    tree = TreeConfig(top_k=3, depth=3, total_tokens=22, clip_to_budget=False)
    dec = SpeculativeDecoder(ad, OracleDrafter(ad, ids, feats, noise=0.2), tree, cfg)
    gen = torch.Generator().manual_seed(4)
    n = 2000
    counts: Counter = Counter()
    deep = 0
    for _ in range(n):
        res = dec.generate(ids, feats, max_new_tokens=4, generator=gen)
        counts[tuple(res.tokens.tolist())] += 1
        deep += res.stats.accepted_drafts[0] >= 3
    assert deep > n // 5, deep
    law3: dict = {}
    for s, p in law.items():
        law3[s[:3]] = law3.get(s[:3], 0.0) + p
    p3, p4 = law_pvalue(marginal(counts, 3), law3), law_pvalue(counts, law)
    assert p3 > ALPHA and p4 > ALPHA, (p3, p4)


def test_missing_processor_files_are_clear(family_dirs, tmp_path):
    path = tmp_path / "qwen"
    shutil.copytree(family_dirs["qwen2_5_vl"], path)
    (path / "chat_template.jinja").unlink()
    proc = FamilyProcessor.load(path)
    with pytest.raises(PromptError, match="ships no chat template"):
        proc.render(*single(50, 40))
    (path / "preprocessor_config.json").unlink()
    with pytest.raises(TargetLoadError, match="preprocessor_config.json"):
        FamilyProcessor.load(path)
