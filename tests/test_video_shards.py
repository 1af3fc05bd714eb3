"""Video training data from webdataset shards (LLaVA-Video style ``<video>`` records, the json's ``videos`` list).

A clip is stored three ways (``specvlm_lit.data.members``): a processed ``.safetensors`` clip (read as it is), a list
of frame images, or a video file (both through the checkpoint's HF video processor). HF's video processors need
torchvision, which this CPU install cannot import, so the two raw routes run against a stand-in video processor
that checks what it is handed (PIL frames in order; a readable file with the member's bytes) and returns a clip's
processed tensors; the reference for every sample is the adapter's own ``render_conversation`` on that clip.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os

import pytest
import torch
import webdataset as wds
from transformers import BatchFeature

from specvlm_lit.data.members import processed_video_bytes
from specvlm_lit.data.shards import SampleEncoder, collate, encode_stage, read_shards
from specvlm_lit.target import TargetAdapter
from specvlm_lit.targets import VideoProcessorUnavailable, VisualInputs, load_prompt_builder
from specvlm_lit.targets.processor import as_chat
from tests.families.build import build_family
from tests.families.reference import image
from tests.helpers import write_shard
from tests.test_family_video import clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(ROOT, "data", "embedded_target")
VIDEO_QUESTION = [
    {"from": "human", "value": "<video>\nWhat is shown in the image?"},
    {"from": "gpt", "value": "There are two cats and one dog."},
]
VIDEO_AND_IMAGE = [
    {"from": "human", "value": "<video>\n<image>\nCompare both images and answer briefly."},
    {"from": "gpt", "value": "The left one is brighter than the right one."},
    {"from": "human", "value": "Where is the ball?"},
    {"from": "gpt", "value": "It is grey today."},
]


def _png(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def _sample(key: str, conversations: list, videos: list, members: dict, images: list | None = None) -> tuple:
    record = {"conversations": conversations, "videos": videos} | ({} if images is None else {"images": images})
    return key, {"json": json.dumps(record).encode(), **members}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_shards")
    return {f: build_family(f, root / f) for f in ("qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next")}


class StandInVideoProcessor:
    """The HF video processor's call as the prompt builder makes it, answering with ``clip``'s processed tensors;
    it records what each call was handed (a list of PIL frames, or a file's bytes read from the path given)."""

    def __init__(self, clip_inputs: VisualInputs, fail: Exception | None = None):
        self.clip, self.fail, self.seen = clip_inputs, fail, []

    def __call__(self, videos, **kwargs):
        (video,) = videos
        if isinstance(video, str):
            with open(video, "rb") as f:
                self.seen.append(("file", os.path.splitext(video)[1], f.read()))
        else:
            self.seen.append(("frames", [(im.mode, im.size) for im in video]))
        if self.fail is not None:
            raise self.fail
        return BatchFeature(self.clip.hf_kwargs())


def _encode(encoder, shard):
    return [encoder(raw) for raw in wds.WebDataset(str(shard), shardshuffle=False)]


def _same_as_reference(ad, sample, conversations, images, video):
    ref = ad.render_conversation(as_chat(conversations), images, videos=video)
    assert torch.equal(sample["input_ids"], ref.input_ids[0]) and torch.equal(sample["loss_mask"], ref.loss_mask[0])
    assert sample["layouts"] == ref.layouts and sample["pixel_values"].kinds == ref.visual.kinds
    for name, value in ref.visual.hf_kwargs().items():
        torch.testing.assert_close(getattr(sample["pixel_values"], name), value, atol=0, rtol=0)
    assert sample["pixel_values"].video_timestamps == ref.visual.video_timestamps


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_processed_clips_in_shards_give_the_familys_own_samples(family, dirs, tmp_path):
    ad = TargetAdapter.from_pretrained(dirs[family])
    clips = [clip(ad, seed=1), clip(ad, seed=2)]
    if family == "qwen3_vl":  # its frame times are prompt text: they must survive the member
        clips[1].video_timestamps = [[0.25, 1.75]]
    shard = write_shard(
        tmp_path / "video-000000.tar",
        [
            _sample("v0", VIDEO_QUESTION, ["v0.0.safetensors"], {"0.safetensors": processed_video_bytes(clips[0])}),
            _sample(
                "v1",
                VIDEO_AND_IMAGE,
                ["v1.clip.safetensors"],
                {"clip.safetensors": processed_video_bytes(clips[1]), "0.png": _png(40, 90, 7)},
                images=["v1.0.png"],
            ),
        ],
    )
    encoder = SampleEncoder(load_prompt_builder(dirs[family]), 1024)
    samples = _encode(encoder, shard)
    assert all(s is not None for s in samples), encoder.skipped
    _same_as_reference(ad, samples[0], VIDEO_QUESTION, [], clips[0])
    _same_as_reference(ad, samples[1], VIDEO_AND_IMAGE, [image(40, 90, 7)], clips[1])
    assert not samples[0]["loss_mask"][ad.visual_token_mask(samples[0]["input_ids"])].any()

    # the shard pipeline's own stages read them; batched, the teacher + drafter take them
    from specvlm_lit.training.distill import OnlineDistillation

    stages = wds.DataPipeline(wds.SimpleShardList(str(shard)), read_shards(encoder), encode_stage(encoder))
    batch = collate([s for s in stages if "stats_only" not in s], pad_id=0)
    assert batch["pixel_values"].count("video") == 2 and batch["image_counts"] in ([1, 2], [2, 1])
    module = OnlineDistillation(str(dirs[family]), torch.optim.AdamW)
    loss, _ = module._losses(module.draft_batch(batch), "train")
    loss.backward()
    assert torch.isfinite(loss) and module.drafter.fc.weight.grad.abs().sum() > 0


def test_frame_lists_and_video_files_go_through_the_video_processor(dirs, tmp_path):
    path = dirs["qwen2_5_vl"]
    ad = TargetAdapter.from_pretrained(path)
    video = clip(ad, seed=3)
    frames = {f"0.f{i}.png": _png(32 + 8 * i, 24, seed=i) for i in range(4)}
    mp4 = b"\x00\x00\x00\x18ftypmp42 not really a movie"
    shard = write_shard(
        tmp_path / "raw-000000.tar",
        [
            _sample("f0", VIDEO_QUESTION, [[f"f0.{name}" for name in frames]], frames),
            _sample("m0", VIDEO_QUESTION, ["m0.mp4"], {"mp4": mp4}),
        ],
    )
    encoder = SampleEncoder(load_prompt_builder(path), 1024)
    encoder.prompts._video_processor = stand_in = StandInVideoProcessor(video)
    samples = _encode(encoder, shard)
    assert all(s is not None for s in samples), encoder.skipped
    for s in samples:
        _same_as_reference(ad, s, VIDEO_QUESTION, [], video)
    frames_call, file_call = stand_in.seen
    assert frames_call == ("frames", [("RGB", (32 + 8 * i, 24)) for i in range(4)])  # in time order
    assert file_call == ("file", ".mp4", mp4)


# ------------------------------------------------------------------------------------------------ bad input
def _skips(path, tmp_path, samples, video_processor=None) -> dict:
    encoder = SampleEncoder(load_prompt_builder(path), 1024)
    if video_processor is not None:
        encoder.prompts._video_processor = video_processor
    out = _encode(encoder, write_shard(tmp_path / "bad-000000.tar", samples))
    assert out == [None] * len(samples)
    return {k: v for k, v in encoder.take_skipped().items() if v}


def test_bad_video_members_are_skipped_and_counted(dirs, tmp_path):
    path = dirs["qwen2_5_vl"]
    ad = TargetAdapter.from_pretrained(path)
    two_videos = VisualInputs.concat([clip(ad, seed=4), clip(ad, seed=5)])
    samples = [
        _sample("a", VIDEO_QUESTION, ["a.0.safetensors"], {}),  # named, absent
        _sample("b", VIDEO_QUESTION, [["b.f0.png", "b.f1.png"]], {"f0.png": _png(32, 32, 0)}),  # a frame absent
        _sample("c", VIDEO_QUESTION, ["c.0.safetensors"], {"0.safetensors": b"not safetensors"}),
        _sample("d", VIDEO_QUESTION, ["d.0.safetensors"], {"0.safetensors": _wrong_keys()}),
        _sample("e", VIDEO_QUESTION, ["e.0.safetensors"], {"0.safetensors": _two_clips(two_videos)}),
        _sample("f", VIDEO_QUESTION, [["f.f0.png"]], {"f0.png": b"\x89PNG broken"}),
        _sample("g", VIDEO_QUESTION, [{"path": "x.mp4"}], {}),  # not a member name
        _sample("h", VIDEO_QUESTION, ["h.0.txt"], {"0.txt": b"hello"}),  # not a video member kind
        _sample("i", VIDEO_QUESTION, [], {}),  # a <video> placeholder without its video
    ]
    assert _skips(path, tmp_path, samples) == {
        "missing_video": 2,
        "corrupt_video": 4,
        "bad_conversation": 3,
        "seen": 9,
    }
    # a file the decoder cannot read is that sample's problem: counted, the stream goes on
    broken = StandInVideoProcessor(clip(ad, seed=6), fail=RuntimeError("moov atom not found"))
    assert _skips(path, tmp_path, [_sample("m", VIDEO_QUESTION, ["m.mp4"], {"mp4": b"junk"})], broken) == {
        "corrupt_video": 1,
        "seen": 1,
    }


def _wrong_keys() -> bytes:
    from safetensors.torch import save

    return save({"pixel_values": torch.zeros(2, 3)})


def _two_clips(videos: VisualInputs) -> bytes:
    from safetensors.torch import save

    return save({"pixel_values_videos": videos.pixel_values_videos, "video_grid_thw": videos.video_grid_thw})


def test_processed_video_bytes_takes_exactly_one_clip(dirs):
    ad = TargetAdapter.from_pretrained(dirs["qwen2_5_vl"])
    with pytest.raises(ValueError, match="one video's inputs.*got 2"):
        processed_video_bytes(VisualInputs.concat([clip(ad, seed=7), clip(ad, seed=8)]))


@pytest.mark.parametrize("target", ["llava_next", "embedded"])
def test_video_samples_for_an_image_only_target_are_counted(target, dirs, tmp_path):
    path = EMBEDDED if target == "embedded" else dirs[target]
    member = {"0.safetensors": processed_video_bytes(clip(TargetAdapter.from_pretrained(dirs["qwen2_5_vl"]), 9))}
    counts = _skips(path, tmp_path, [_sample("v", VIDEO_QUESTION, ["v.0.safetensors"], member)])
    assert counts == {"video_unsupported": 1, "seen": 1}


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_raw_video_without_torchvision_stops_the_pipeline_with_the_fix(dirs, tmp_path):
    """Not a skip: every raw video would be skipped for a reason of the machine, not of the data."""
    encoder = SampleEncoder(load_prompt_builder(dirs["qwen2_5_vl"]), 1024)
    shard = write_shard(tmp_path / "raw-000000.tar", [_sample("m", VIDEO_QUESTION, ["m.mp4"], {"mp4": b"x"})])
    with pytest.raises(VideoProcessorUnavailable, match="needs torchvision.*already-processed"):
        _encode(encoder, shard)


# ------------------------------------------------------------------------------------------------ converter
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(64))


def test_llava_video_records_convert_to_video_members(dirs, tmp_path):
    """python -m specvlm_lit.data.convert on LLaVA-Video records: each ``video`` file is copied byte for byte into a
    member the json's ``videos`` names, and the loader reads the sample back as the family renders it."""
    from specvlm_lit.data.convert import convert

    root = tmp_path / "media"
    (root / "clips").mkdir(parents=True)
    (root / "clips" / "a.mp4").write_bytes(MP4)
    (root / "clips" / "junk.mp4").write_bytes(b"<html>404 not found</html>")
    (root / "clips" / "notes.txt").write_bytes(b"hello")
    image(40, 90, 7).save(root / "still.png")
    records = [
        {"id": "clip", "video": "clips/a.mp4", "conversations": VIDEO_QUESTION},
        {"id": "both", "video": ["clips/a.mp4"], "image": "still.png", "conversations": VIDEO_AND_IMAGE},
        {"id": "missing", "video": "clips/gone.mp4", "conversations": VIDEO_QUESTION},
        {"id": "junk", "video": "clips/junk.mp4", "conversations": VIDEO_QUESTION},
        {"id": "text-file", "video": "clips/notes.txt", "conversations": VIDEO_QUESTION},
        {"id": "remote", "video": "https://example.com/a.mp4", "conversations": VIDEO_QUESTION},
        {
            "id": "no-placeholder",
            "video": "clips/a.mp4",
            "conversations": [{"from": "human", "value": "Q?"}, VIDEO_QUESTION[1]],
        },
    ]
    (tmp_path / "videos.json").write_text(json.dumps(records))
    chat = {
        "id": "chat",
        "video": "clips/a.mp4",
        "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
    }
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    out = tmp_path / "out"
    inputs = [str(tmp_path / "videos.json"), str(tmp_path / "chat.jsonl")]
    manifest = convert(inputs, str(out), image_root=str(root), workers=1, log=lambda *_: None)
    lines = (out / "rejects.jsonl").read_text().splitlines()
    assert {e["id"]: e["reason"] for e in map(json.loads, lines)} == {
        "missing": "missing_video",
        "junk": "corrupt_video",
        "text-file": "corrupt_video",
        "remote": "missing_video",
        "no-placeholder": "bad_conversation",
        "chat": "bad_conversation",
    }
    assert manifest["counts"]["written"] == 2

    path = dirs["qwen2_5_vl"]
    ad = TargetAdapter.from_pretrained(path)
    video = clip(ad, seed=10)
    encoder = SampleEncoder(load_prompt_builder(path), 1024)
    encoder.prompts._video_processor = stand_in = StandInVideoProcessor(video)
    raws = [raw for shard in sorted(out.glob("train-*.tar")) for raw in wds.WebDataset(str(shard), shardshuffle=False)]
    by_id = {json.loads(raw["json"])["id"]: raw for raw in raws}
    assert json.loads(by_id["clip"]["json"])["videos"] == [f"{by_id['clip']['__key__']}.v0.mp4"]
    assert by_id["clip"]["v0.mp4"] == MP4 and by_id["both"]["v0.mp4"] == MP4
    _same_as_reference(ad, encoder(by_id["clip"]), VIDEO_QUESTION, [], video)
    _same_as_reference(ad, encoder(by_id["both"]), VIDEO_AND_IMAGE, [image(40, 90, 7).convert("RGB")], video)
    assert [call[:2] for call in stand_in.seen] == [("file", ".mp4")] * 2
