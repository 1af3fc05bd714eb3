"""Video for the video families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) against Hugging Face's own code.

HF's video processors need torchvision, which this CPU install cannot import, so the clips are built as the video
processor would emit them: random ``pixel_values_videos`` of its shapes with the matching ``video_grid_thw``
(Qwen-VL: 4 frames = 2 temporal patches) or ``[1, frames, 3, S, S]`` frames (OneVision), passed to the processor as
already-processed inputs. References: HF's processor class (with a stand-in returning those tensors as its video
processor) for the prompt, HF ``forward`` / ``generate()`` on the same inputs for the outputs.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import BatchFeature
from transformers.video_utils import VideoMetadata

from specvlm_lit.decoding.acceptance import WarpConfig
from specvlm_lit.decoding.configs import TreeConfig
from specvlm_lit.decoding.speculative import SpeculativeDecoder
from specvlm_lit.target import TargetAdapter
from specvlm_lit.targets import FamilyProcessor, PromptError, VideoUnsupportedError, VisualInputs
from tests.families.build import QWEN_MERGE, QWEN_PATCH, build_family
from tests.families.reference import hf_processor, image

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")
ATOL = 1e-4  # as tests/test_families.py: logits are O(10) at the raised init scale
FRAMES = 4
QUESTION = "What is shown in the image?"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_families")
    return {family: build_family(family, root / family) for family in (*VIDEO_FAMILIES, "llava_next")}


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def adapter(request, dirs):
    return TargetAdapter.from_pretrained(dirs[request.param])


def clip(ad, seed: int, height: int = 4, width: int = 6) -> VisualInputs:
    """A 4-frame clip as the family's video processor lays it out (Qwen: ``height x width`` patches per frame)."""
    g = torch.Generator().manual_seed(seed)
    if ad.config.model_type == "llava_onevision":
        size = int(ad.config.vision_config.image_size)
        return VisualInputs(pixel_values_videos=torch.randn(1, FRAMES, 3, size, size, generator=g))
    steps = FRAMES // 2  # temporal_patch_size 2
    pixels = torch.randn(steps * height * width, 3 * 2 * QWEN_PATCH * QWEN_PATCH, generator=g)
    out = VisualInputs(pixel_values_videos=pixels, video_grid_thw=torch.tensor([[steps, height, width]]))
    if ad.config.model_type == "qwen2_5_vl":
        out.second_per_grid_ts = torch.tensor([0.5])  # 2 frames per temporal patch at 4 fps
    return out


def video_only(question=QUESTION):
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]


def video_then_image():
    """A video and an image in one turn (Qwen keeps the content order; OneVision's template puts images first)."""
    items = [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Compare both images and answer briefly."}]
    return [{"role": "user", "content": items}], [image(40, 90, 7)]


def hf_generate(ad, prompt, n: int) -> list[int]:
    ids = prompt.input_ids
    kwargs = ad.hf_generate_inputs(ids, prompt.visual)
    out = ad.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **kwargs,
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :].tolist()


def token_runs(ids: torch.Tensor, visual_ids) -> list[tuple[int, int]]:
    """(token id, length) of every maximal run of one visual placeholder id, in order."""
    runs: list[tuple[int, int]] = []
    previous = None
    for token in ids.tolist():
        if token in visual_ids:
            if token == previous:
                runs[-1] = (token, runs[-1][1] + 1)
            else:
                runs.append((token, 1))
        previous = token
    return runs


# -------------------------------------------------------------------------------------------------- prompt
class _StandInVideoProcessor:
    """What HF's processor asks of its video processor, returning precomputed outputs (no torchvision)."""

    merge_size, temporal_patch_size = QWEN_MERGE, 2

    def __init__(self, outputs: dict):
        self.outputs = outputs

    def __call__(self, videos, **kwargs):
        return BatchFeature(self.outputs, skip_tensor_conversion=["video_metadata"])


def test_prompt_equals_hf_processor_with_video(adapter):
    """The expansion (Qwen3-VL's per-frame timestamp text included) is HF's processor's, token for token."""
    proc = adapter.processor
    video = clip(adapter, seed=0)
    messages, images = video_then_image()
    prompt = adapter.render_prompt(messages, images, videos=video)
    hf = hf_processor(adapter.config.model_type, adapter.model.name_or_path, proc.tokenizer, proc.image_processor)
    metadata = VideoMetadata(total_num_frames=FRAMES, fps=None, frames_indices=list(range(FRAMES)))
    hf.video_processor = _StandInVideoProcessor({**video.hf_kwargs(), "video_metadata": [metadata]})
    frames = np.zeros((FRAMES, 32, 32, 3), dtype=np.uint8)  # only counted: the stand-in returns the clip
    ref = hf(text=[prompt.text], images=[images], videos=[frames], return_tensors="pt")
    assert torch.equal(prompt.input_ids, ref["input_ids"])
    if "mm_token_type_ids" in ref:
        assert torch.equal(adapter.mm_token_type_ids(prompt.input_ids), ref["mm_token_type_ids"].to(torch.int32))


def test_layouts_cover_the_visual_tokens_in_prompt_order(adapter):
    ad = adapter
    messages, images = video_then_image()
    prompt = ad.render_prompt(messages, images, videos=clip(ad, seed=1))
    assert ad.visual_token_ids == (ad.image_token_id, ad.video_token_id)
    runs = token_runs(prompt.input_ids[0], ad.visual_token_ids)
    layouts = ad.layouts_of(prompt.visual)
    assert [(lay.segments, lay.frames) for lay in layouts] == [(lay.segments, lay.frames) for lay in prompt.layouts]
    assert [n for _, n in runs] == [layout.num_tokens for layout in layouts]
    kinds = [token for token, _ in runs]
    video = [layout for layout, token in zip(layouts, kinds) if token == ad.video_token_id]
    family = ad.config.model_type
    if family == "qwen3_vl":  # one run per temporal patch, separated by its timestamp text
        assert len(video) == FRAMES // 2 and all(v.segments == [("merged", 2, 3)] and v.frames == 1 for v in video)
        assert "seconds>" in ad.processor.tokenizer.decode(prompt.input_ids[0])
    elif family == "llava_onevision":  # pooled 2x2 frames, then one newline token
        (layout,) = video
        assert layout.segments == [("merged", 2, 2), ("newline", 1, 1)] and layout.frames == FRAMES
        assert kinds == [ad.image_token_id, ad.video_token_id]  # its template puts images before videos
    else:
        (layout,) = video
        assert layout.segments == [("merged", 2, 3)] and layout.frames == FRAMES // 2
    if family != "llava_onevision":
        assert kinds[0] == ad.video_token_id and kinds[-1] == ad.image_token_id  # the content order
    # Every layout's pieces and extra tokens tile its run exactly.
    for layout in layouts:
        covered = sum(piece.index.numel() for piece in layout.pieces()) + layout.extra_indices().numel()
        assert covered == layout.num_tokens


# ------------------------------------------------------------------------------------------------- forward
def test_forward_equals_hf_model_on_video(adapter):
    ad = adapter
    cases = [(video_only(), [], clip(ad, seed=2)), (*video_then_image(), clip(ad, seed=3))]
    for messages, images, video in cases:
        prompt = ad.render_prompt(messages, images, videos=video)
        ids = prompt.input_ids
        expected = ad.model(input_ids=ids, **ad.hf_generate_inputs(ids, prompt.visual)).logits
        torch.testing.assert_close(ad.forward(ids, pixel_values=prompt.visual).logits, expected, atol=ATOL, rtol=0)
    if ad.config.model_type == "qwen2_5_vl":  # the video's time spacing reaches the positions (HF default: 1 s)
        video = clip(ad, seed=2)
        logits = [
            ad.forward(p.input_ids, pixel_values=p.visual).logits
            for p in (
                ad.render_prompt(video_only(), videos=v) for v in (video, replace(video, second_per_grid_ts=None))
            )
        ]
        assert (logits[0] - logits[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------- speculative decoding
def video_oracle(ad, input_ids, feats, noise: float):
    """tests/test_speculative.py's OracleDrafter (the target's own continuation, with injected mistakes when noisy)
    keyed for video: it reads every visual row back as the image token id, so its prompt key says so too."""
    from tests.test_speculative import OracleDrafter

    drafter = OracleDrafter(ad, input_ids, feats, noise=noise)

    def key(context: tuple) -> tuple:
        return tuple(ad.image_token_id if token == ad.video_token_id else token for token in context)

    drafter.prompt = key(drafter.prompt)
    drafter.memo = {key(context): feature for context, feature in drafter.memo.items()}
    return drafter


@pytest.mark.parametrize("noise", [0.0, 0.3], ids=["oracle", "noisy_oracle"])
def test_speculative_greedy_with_video_equals_hf_generate(adapter, noise):
    """SpeculativeDecoder over a video prompt (tree verification with the video's mRoPE positions) is
    token-identical to HF generate() on the same inputs, with a drafter that accepts often."""
    ad = adapter
    n = 24
    sigmas, answers = [], set()
    cases = [(video_only(), [], clip(ad, seed=s)) for s in (4, 5)] + [(*video_then_image(), clip(ad, seed=6))]
    for messages, images, video in cases:
        prompt = ad.render_prompt(messages, images, videos=video)
        expected = hf_generate(ad, prompt, n)
        feats = ad.encode_images(prompt.visual)
        drafter = video_oracle(ad, prompt.input_ids, feats, noise)
        dec = SpeculativeDecoder(ad, drafter, TreeConfig(4, 4, 16), WarpConfig())
        res = dec.generate(prompt.input_ids, feats, max_new_tokens=n, eos_token_id=None)
        assert res.tokens.tolist() == expected
        sigmas.append(res.stats.sigma)
        answers.add(tuple(expected))
    assert min(sigmas) > 2, sigmas
    assert len(answers) == len(cases), answers  # the answer follows the clip's content (same-shape clips differ)


def test_training_steps_on_a_video_batch_reduce_the_loss(adapter, dirs):
    """Online distillation on a batch of video conversations (one clip-only, one clip + image): the teacher runs on
    the processor's video inputs, the compressor sees each clip's layout, and a few steps reduce the loss."""
    import functools

    from specvlm_lit.data.shards import collate
    from specvlm_lit.training.distill import OnlineDistillation

    ad = adapter
    answer = {"role": "assistant", "content": [{"type": "text", "text": "There are two cats and one dog."}]}
    cases = [(video_only(), [], clip(ad, seed=11)), (*video_then_image(), clip(ad, seed=12))]
    samples = []
    for k, (messages, images, video) in enumerate(cases):
        rendered = ad.render_conversation([*messages, answer], images, videos=video)
        samples.append(
            {
                "__key__": f"v{k}",
                "input_ids": rendered.input_ids[0],
                "loss_mask": rendered.loss_mask[0],
                "pixel_values": rendered.visual,
                "layouts": rendered.layouts,
                "record": {},
                "stats": {},
            }
        )
    batch = collate(samples, pad_id=0)
    assert batch["image_counts"] == [1, 2] and batch["pixel_values"].count("video") == 2
    torch.manual_seed(0)
    path = dirs[ad.config.model_type]
    module = OnlineDistillation(
        str(path),
        functools.partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95)),
        compressor={"type": "pool", "ratio": 4},
    )
    pool = module.drafter.compressor
    expected_rows = [sum(pool.num_output_tokens(layout) for layout in s["layouts"]) for s in samples]
    opt = module.configure_optimizers()
    losses = []
    for _ in range(6):
        db = module.draft_batch(batch)
        assert db.valid.any() and list(db.visual_rows) == expected_rows  # each clip pooled frame by frame
        loss, _ = module._losses(db, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


# ------------------------------------------------------------------------------------------------ bad input
def test_video_to_an_image_only_family_is_clear(dirs):
    proc = FamilyProcessor.load(dirs["llava_next"])
    with pytest.raises(VideoUnsupportedError, match="llava_next targets take images only"):
        proc.render(video_only(), videos=VisualInputs(pixel_values_videos=torch.zeros(1, FRAMES, 3, 32, 32)))


def test_video_count_mismatch_and_bad_video_inputs_are_clear(dirs):
    ad = TargetAdapter.from_pretrained(dirs["qwen2_vl"])
    video = clip(ad, seed=7)
    with pytest.raises(PromptError, match="1 video placeholder.*2 video"):
        ad.render_prompt(video_only(), videos=[video, video])
    with pytest.raises(PromptError, match="pixel_values_videos"):
        ad.render_prompt(video_only(), videos=VisualInputs(pixel_values=torch.zeros(4, 384)))
    inline = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": QUESTION}]}]
    assert torch.equal(ad.render_prompt(inline).input_ids, ad.render_prompt(video_only(), videos=video).input_ids)


def test_batch_concat_and_sample_keep_each_prompts_videos(adapter):
    """What collate / shards do with a batch of prompts: concat, then each sample's share back out, in order."""
    ad = adapter
    messages, images = video_then_image()
    visuals = [
        ad.render_prompt(video_only(), videos=clip(ad, seed=8)).visual,
        ad.render_prompt(messages, images, videos=clip(ad, seed=9)).visual,
    ]
    batch = VisualInputs.concat(visuals)
    counts = [v.num_images for v in visuals]
    assert counts == [1, 2] and batch.kinds == visuals[0].kinds + visuals[1].kinds
    for i, original in enumerate(visuals):
        share = batch.sample(i, counts)
        assert share.kinds == original.kinds
        for name, value in original.hf_kwargs().items():
            assert torch.equal(getattr(share, name), value), name
