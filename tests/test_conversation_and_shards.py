import json

import pytest

from recipes.embedded_target.tokenizer import build_processor
from specvlm_lit.data.conversation import ConversationError, encode_conversation, prompt_ids
from specvlm_lit.data.datamodule import ShardDataModule
from specvlm_lit.data.skips import BadSampleMonitor, NoUsableSamples, TooManyBadSamples
from specvlm_lit.target import llava_visual_tokens
from tests.helpers import write_shard

CONV = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "The circle is red. It is a small shape on the left."},
    {"from": "human", "value": "How many shapes are there in total?"},
    {"from": "gpt", "value": "There are two shapes: a red circle and a blue square."},
]


def test_ids_equal_chat_template_and_mask_covers_answers_only(corpus_tokenizer):
    tok = corpus_tokenizer
    enc = encode_conversation(CONV, tok, num_image_tokens=5)
    messages = [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in CONV]
    text = tok.apply_chat_template(messages, tokenize=False).replace("<image>", "<image>" * 5)
    assert enc.input_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    learned = tok.decode(enc.input_ids[enc.loss_mask])
    assert learned == " " + CONV[1]["value"] + "</s> " + CONV[3]["value"] + "</s>"
    assert (enc.input_ids == tok.convert_tokens_to_ids("<image>")).sum() == 5


def test_prompt_matches_generation_prompt(corpus_tokenizer):
    tok = corpus_tokenizer
    ids = prompt_ids("What color is the circle?", tok, 3)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat color is the circle?"}], tokenize=False, add_generation_prompt=True
    ).replace("<image>", "<image>" * 3)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ConversationError, match="empty"):
        prompt_ids("   ", tok, 3)


@pytest.mark.parametrize(
    "conv, message",
    [
        ([{"from": "human", "value": "<image>\nHi?"}], "no assistant answer"),
        ([{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "  "}], "no assistant answer"),
        ([{"from": "gpt", "value": "x"}], "start with a human"),
        ([{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "x"}], "placeholder"),
        ([{"from": "robot", "value": "x"}], "not a human/gpt"),
    ],
)
def test_bad_conversations(conv, message, corpus_tokenizer):
    with pytest.raises(ConversationError, match=message):
        encode_conversation(conv, corpus_tokenizer, num_image_tokens=4)


def test_truncation_keeps_image_and_reports(corpus_tokenizer):
    enc = encode_conversation(CONV, corpus_tokenizer, num_image_tokens=5, max_length=20)
    assert enc.truncated and len(enc.input_ids) == 20
    with pytest.raises(ConversationError, match="image tokens"):
        encode_conversation(CONV, corpus_tokenizer, num_image_tokens=50, max_length=20)


def test_bad_samples_are_skipped_and_counted(tmp_path, small_corpus, corpus_tokenizer):
    good = [s for s in __import__("webdataset").WebDataset(str(small_corpus / "val-000000.tar"), shardshuffle=False)][
        :4
    ]
    no_answer = json.dumps({"conversations": [{"from": "human", "value": "<image>\nHi?"}]}).encode()
    samples = [(g["__key__"], {"png": g["png"], "json": g["json"]}) for g in good]
    samples += [
        ("bad-img", {"png": b"not a png", "json": good[0]["json"]}),
        ("bad-json", {"png": good[0]["png"], "json": b"{oops"}),
        ("no-ans", {"png": good[0]["png"], "json": no_answer}),
        ("no-img", {"json": good[0]["json"]}),
    ]
    shard = tmp_path / "mixed-000000.tar"
    write_shard(shard, samples)
    processor = build_processor(corpus_tokenizer, patch_size=8)
    dm = ShardDataModule([str(shard)], [str(shard)], processor, batch_size=2, num_workers=0)
    batches = list(dm.val_dataloader())
    assert sum(b["input_ids"].shape[0] for b in batches) == 4
    stats = dm.val_bad_samples.counts  # the loader takes every count out of the stream, batches or not
    assert stats["seen"] == 8
    assert stats["corrupt_image"] == 1 and stats["bad_json"] == 1 and stats["no_answer"] == 1
    assert stats["missing_image"] == 1
    for b in batches:  # bucketed: one image size per batch, visual tokens == image tokens in ids
        sizes = {tuple(p.shape[-2:]) for p in b["pixel_values"]}
        assert len(sizes) == 1
        h, w = sizes.pop()
        n_img = (b["input_ids"] == corpus_tokenizer.convert_tokens_to_ids("<image>")).sum(1)
        assert (n_img == llava_visual_tokens(h, w, 8)).all()
        assert not b["loss_mask"][b["attention_mask"] == 0].any()


def test_bad_sample_monitor_stops_past_the_limit():
    m = BadSampleMonitor("train", max_bad_fraction=0.1, min_seen=10)
    m.update({"seen": 5, "corrupt_image": 2})
    m.check()  # 2 of 5 bad, but 5 samples say too little (min_seen)
    m.update({"seen": 35, "corrupt_image": 2})
    m.check()  # 4 of 40: judged, exactly at the limit
    m.update({"seen": 1, "corrupt_image": 1})
    with pytest.raises(TooManyBadSamples, match="corrupt_image=5"):
        m.check()
    with pytest.raises(ValueError, match="data.max_bad_fraction"):
        BadSampleMonitor("train", max_bad_fraction=2)


def test_bad_sample_monitor_judges_every_pass_end_and_a_pass_without_usable_samples():
    m = BadSampleMonitor("val", max_bad_fraction=0.5, min_seen=32)
    m.start_pass()
    m.update({"seen": 4, "bad_json": 3})
    m.check()  # mid-pass: too few to judge
    with pytest.raises(TooManyBadSamples, match="bad_json=3"):
        m.check(end_of_pass=True)  # at the end of a pass always
    m = BadSampleMonitor("val", max_bad_fraction=1.0)
    m.start_pass()
    m.update({"seen": 2, "corrupt_image": 2})
    with pytest.raises(NoUsableSamples, match="no usable val sample"):
        m.check(end_of_pass=True)  # even when every sample may be bad


def test_corrupt_tar_is_skipped_and_counted(tmp_path, small_corpus, corpus_tokenizer):
    src = (small_corpus / "val-000000.tar").read_bytes()
    broken = tmp_path / "broken-000000.tar"
    broken.write_bytes(src[: len(src) // 2 + 100])  # cut mid-member: tarfile raises part-way through
    processor = build_processor(corpus_tokenizer, patch_size=8)
    dm = ShardDataModule(
        [str(broken)], [str(small_corpus / "val-000000.tar"), str(broken)], processor, batch_size=2, num_workers=0
    )
    batches = list(dm.val_dataloader())
    stats = dm.val_bad_samples.counts
    assert stats["corrupt_tar"] == 1  # one shard cut short, counted once; its incomplete last sample is part of it
    assert not stats["missing_image"] and not stats["missing_json"] and not stats["bad_json"]
    assert sum(b["input_ids"].shape[0] for b in batches) >= 16  # the intact shard still flows


@pytest.mark.parametrize("counts", [[], [3, 5], [4, 2, 6]], ids=["text-only", "two-images", "three-images"])
def test_several_images_or_none_equal_the_chat_template(counts, corpus_tokenizer):
    """Each placeholder takes the next image's token count (images in later turns too); text-only has none."""
    tok = corpus_tokenizer
    first = "<image>\n" * min(len(counts), 2) + "Compare the pictures." if counts else "Name a colour."
    conv = [
        {"from": "human", "value": first},
        {"from": "gpt", "value": "The first is red and the second is blue."},
        {"from": "human", "value": ("<image>\n" if len(counts) > 2 else "") + "And this one?"},
        {"from": "gpt", "value": "It is green."},
    ]
    enc = encode_conversation(conv, tok, counts)
    messages = [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in conv]
    text = tok.apply_chat_template(messages, tokenize=False)
    for n in counts:  # placeholders in order, each expanded to its own image's tokens
        text = text.replace("<image>", "\x00" * n, 1)
    assert enc.input_ids.tolist() == tok(text.replace("\x00", "<image>"), add_special_tokens=False)["input_ids"]
    assert (enc.input_ids == tok.convert_tokens_to_ids("<image>")).sum() == sum(counts)
    assert tok.decode(enc.input_ids[enc.loss_mask]) == " " + conv[1]["value"] + "</s> " + conv[3]["value"] + "</s>"
    with pytest.raises(ConversationError, match="placeholder per image"):
        encode_conversation(conv, tok, [*counts, 7])


def test_llava_samples_are_the_vicuna_encoding_of_the_image_as_decoding_sizes_it(small_corpus, tiny_target):
    """A LLaVA-1.5 target -- its directory, or an in-memory HF processor -- goes through its family's prompt builder
    (targets/llava.py): a sample is the Vicuna encoding with the placeholder expanded to the image's token count and
    the image processor's pixels of the image at the size decoding hands it (downscaled to the tower's native size
    only when the target's config is known), so the embedded target's training data did not change."""
    import io

    import torch
    import webdataset as wds
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    from specvlm_lit.data.shards import SampleEncoder
    from specvlm_lit.target import resize_for_target, visual_token_counter
    from specvlm_lit.targets import as_prompt_builder

    processor = AutoProcessor.from_pretrained(tiny_target)
    vision = AutoConfig.from_pretrained(tiny_target).vision_config
    count = visual_token_counter(processor)
    raws = list(wds.WebDataset(str(small_corpus / "val-000000.tar"), shardshuffle=False))[:6]
    for source, knows_config in ((str(tiny_target), True), (processor, False)):
        encoder = SampleEncoder(as_prompt_builder(source), 512)
        for raw in raws:
            got = encoder(raw)
            image = Image.open(io.BytesIO(raw["png"])).convert("RGB")
            if knows_config:
                image = resize_for_target(image, processor.image_processor, vision)
            pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
            conversation = json.loads(raw["json"])["conversations"]
            n_image = count(*pixels.shape[-2:])
            expected = encode_conversation(conversation, processor.tokenizer, [n_image], max_length=512)
            assert torch.equal(got["input_ids"], expected.input_ids) and torch.equal(
                got["loss_mask"], expected.loss_mask
            )
            assert len(got["pixel_values"]) == 1 and torch.equal(got["pixel_values"][0], pixels)
            assert [lay.num_tokens for lay in got["layouts"]] == [n_image]


@pytest.mark.parametrize("family, grid_field", [("qwen2_5_vl", "image_grid_thw"), ("llava_next", "image_sizes")])
def test_family_shards_batch_with_their_processor_outputs_and_layouts(family, grid_field, tmp_path):
    """A chat-template family's directory as data.processor: a batch carries the family's processor outputs (Qwen's
    patch grids, AnyRes image sizes) for every image, each row's visual tokens are exactly its layouts' count, and
    each row is the checkpoint's own chat format (its render_conversation: ChatML, [INST])."""
    import io

    from specvlm_lit.data.shards import sample_images
    from specvlm_lit.targets import VisualInputs, load_prompt_builder
    from specvlm_lit.targets.processor import as_chat
    from tests.families.build import build_family
    from tests.families.reference import image

    target = build_family(family, tmp_path / family)
    images = {f"s{k}": image(w, h, seed=k) for k, (w, h) in enumerate(((50, 40), (50, 40), (40, 90)))}
    samples = []
    for key, picture in images.items():  # two of one size batch together, one apart
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        samples.append((key, {"json": json.dumps({"conversations": CONV}).encode(), "png": buf.getvalue()}))
    shard = write_shard(tmp_path / "train-000000.tar", samples)
    dm = ShardDataModule(str(shard), str(shard), str(target), batch_size=2, shuffle_buffer=0, num_workers=0)
    builder = load_prompt_builder(target)
    batches = list(dm.val_dataloader())
    assert sorted(b["input_ids"].shape[0] for b in batches) == [1, 2]
    for batch in batches:
        visual = batch["pixel_values"]
        assert isinstance(visual, VisualInputs) and getattr(visual, grid_field).shape[0] == len(batch["keys"])
        for i, (key, layouts) in enumerate(zip(batch["keys"], batch["layouts"])):
            n = int(batch["attention_mask"][i].sum())
            assert (
                batch["input_ids"][i, :n].tolist()
                == builder.render_conversation(as_chat(CONV), [images[key]]).input_ids[0].tolist()
            )
            n_visual = int((batch["input_ids"][i] == builder.image_token_id).sum())
            assert n_visual == sum(layout.num_tokens for layout in layouts) > 0
            assert builder.adapter_cls.image_layouts(builder.config, sample_images(batch, i)) == layouts
