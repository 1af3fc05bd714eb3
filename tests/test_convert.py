"""The dataset converter (python -m specvlm_lit.data.convert): every public format converts (text-only and
several-image samples too), the shards stream through the data module with the tokens and loss masks of encoding the
conversation directly, bad records land in rejects.jsonl with their reason, an interrupted conversion resumes to
byte-identical output, foreign directories are refused untouched."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from specvlm_lit.data import convert as convert_module
from specvlm_lit.data import convert_inputs, convert_output
from specvlm_lit.data.conversation import encode_conversation
from specvlm_lit.data.convert import convert, main
from specvlm_lit.data.convert_inputs import InputFormatError, iter_json_array
from specvlm_lit.data.convert_output import ConversionMismatch, ShardOutput
from specvlm_lit.data.datamodule import ShardDataModule
from specvlm_lit.data.shards import sample_images
from specvlm_lit.errors import UserError
from specvlm_lit.target import visual_token_counter
from specvlm_lit.utils.atomic import ForeignDirectoryError
from tests.conftest import EMBEDDED_TARGET, REPO

# Each logical sample: an image size and colour, and (question, answer) turns. Every format below writes the same
# samples its own way; the expected LLaVA conversation puts "<image>\n" before the first question.
SAMPLES = {
    "cat-01": ((32, 32), (200, 40, 40), [("What colour is the square?", "It is a deep red square.")]),
    "dog-02": (
        (48, 32),
        (30, 160, 60),
        [("Describe the picture.", "A flat green field and nothing else."), ("Anything else?", "No, only green.")],
    ),
    "owl-03": ((32, 40), (20, 40, 220), [("Which colour dominates?", "Blue covers the whole image.")]),
}
TEXT_ONLY = [("Say hello.", "Hello there.")]


def expected_conversation(turns):
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return conv


def image_bytes(size, colour, fmt="JPEG") -> bytes:
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], 4):  # some structure, so the encoders have something to keep
        image.putpixel((x, x % size[1]), (255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_images(root: Path, sub: str = "coco/train2017") -> dict[str, str]:
    """Image files as a LLaVA image folder holds them; returns id -> path relative to ``root``."""
    (root / sub).mkdir(parents=True, exist_ok=True)
    rel = {}
    for sid, (size, colour, _) in SAMPLES.items():
        rel[sid] = f"{sub}/{sid}.jpg"
        (root / rel[sid]).write_bytes(image_bytes(size, colour))
    return rel


def llava_records(rel):
    out = [
        {"id": sid, "image": rel[sid], "conversations": expected_conversation(turns)}
        for sid, (_, _, turns) in SAMPLES.items()
    ]
    text_only = [{"from": "human", "value": TEXT_ONLY[0][0]}, {"from": "gpt", "value": TEXT_ONLY[0][1]}]
    return out + [{"id": "text-only", "conversations": text_only}]


def messages_records(image_ref):
    """OpenAI-style records; ``image_ref(sid)`` gives each first user turn's image part."""
    out = []
    for sid, (_, _, turns) in SAMPLES.items():
        msgs = []
        for i, (q, a) in enumerate(turns):
            content = [image_ref(sid), {"type": "text", "text": q}] if i == 0 else q
            msgs += [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": a}]},
            ]
        out.append({"id": sid, "messages": msgs})
    ((q, a),) = TEXT_ONLY
    out.append({"id": "text-only", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    two = [image_ref("cat-01"), image_ref("dog-02"), {"type": "text", "text": "Compare them."}]
    out.append(
        {
            "id": "two-images",
            "messages": [{"role": "user", "content": two}, {"role": "assistant", "content": "Different."}],
        }
    )
    return out


def data_uri(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def write_format(fmt: str, d: Path) -> tuple[list[Path], Path]:
    """Write the samples in format ``fmt`` under ``d`` (:func:`expected_samples`); returns (inputs, image root)."""
    images = d / "images"
    images.mkdir(parents=True, exist_ok=True)
    if fmt == "llava_json":  # LLaVA-Instruct-665K: one JSON array, paths relative to the image folder
        rel = write_images(images)
        (d / "llava_v1_5_mix.json").write_text(json.dumps(llava_records(rel), indent=1))
        return [d / "llava_v1_5_mix.json"], images
    if fmt == "sharegpt4v_jsonl":  # ShareGPT4V's schema (from/value, "image"), SAM-style folders, one object a line
        rel = write_images(images, "sam/images")
        lines = [json.dumps(r) for r in llava_records(rel)]
        (d / "sharegpt4v.jsonl").write_text("\n".join(lines) + "\n")
        return [d / "sharegpt4v.jsonl"], images
    if fmt == "messages_jsonl":  # image parts with paths, file:// URLs and data URIs, several images per sample
        rel = write_images(images)
        styles = {
            "cat-01": lambda sid: {"type": "image", "image": rel[sid]},
            "dog-02": lambda sid: {"type": "image_url", "image_url": {"url": f"file://{images / rel[sid]}"}},
            "owl-03": lambda sid: {"type": "image_url", "image_url": {"url": data_uri(images / rel[sid])}},
        }
        recs = messages_records(lambda sid: styles[sid](sid))
        (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        return [d / "chat.jsonl"], images
    if fmt == "messages_json":  # a JSON array, string contents with <image> + a record-level images list
        rel = write_images(images)
        recs = []
        for sid, (_, _, turns) in SAMPLES.items():
            msgs = []
            for role, value in ((m["from"], m["value"]) for m in expected_conversation(turns)):
                msgs.append({"role": "user" if role == "human" else "assistant", "content": value})
            recs.append({"id": sid, "messages": msgs, "images": [rel[sid]]})
        (d / "chat.json").write_text(json.dumps(recs))
        return [d / "chat.json"], images
    datasets = pytest.importorskip("datasets", reason="Parquet/Arrow inputs are read with the datasets library")
    if fmt in ("parquet_llava", "arrow_llava"):  # a hub export: the image column holds the bytes
        rows = {"id": [], "image": [], "conversations": []}
        for sid, (size, colour, turns) in SAMPLES.items():
            rows["id"].append(sid)
            rows["image"].append({"bytes": image_bytes(size, colour, "PNG"), "path": None})
            rows["conversations"].append(expected_conversation(turns))
        features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "image": datasets.Image(),
                "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
            }
        )
        ds = datasets.Dataset.from_dict(rows, features=features)
        if fmt == "parquet_llava":
            ds.to_parquet(str(d / "train-00000-of-00001.parquet"))
            return [d / "train-00000-of-00001.parquet"], images
        ds.save_to_disk(str(d / "saved"))
        return sorted((d / "saved").glob("*.arrow")), images
    if fmt == "parquet_messages":  # TRL's llava-instruct-mix-vsft layout: images column, parts point by index
        recs = []
        for sid, (size, colour, turns) in SAMPLES.items():
            msgs = []
            for i, (q, a) in enumerate(turns):
                parts = [{"type": "text", "text": q, "index": None}]
                if i == 0:
                    parts.insert(0, {"type": "image", "text": None, "index": 0})
                msgs += [
                    {"role": "user", "content": parts},
                    {"role": "assistant", "content": [{"type": "text", "text": a, "index": None}]},
                ]
            recs.append({"messages": msgs, "images": [{"bytes": image_bytes(size, colour), "path": None}], "id": sid})
        ds = datasets.Dataset.from_list(recs).cast_column("images", datasets.Sequence(datasets.Image()))
        ds.to_parquet(str(d / "vsft.parquet"))
        return [d / "vsft.parquet"], images
    raise AssertionError(fmt)


FORMAT_CASES = [
    "llava_json",
    "sharegpt4v_jsonl",
    "messages_jsonl",
    "messages_json",
    "parquet_llava",
    "parquet_messages",
    "arrow_llava",
]


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(EMBEDDED_TARGET)


def shard_files(out: Path) -> list[str]:
    return [str(p) for p in sorted(out.glob("train-*.tar"))]


def rejects(out: Path) -> dict[str, str]:
    lines = (out / "rejects.jsonl").read_text().splitlines()
    return {e["id"]: e["reason"] for e in map(json.loads, lines)}


def quiet(*_):
    pass


def expected_samples(fmt: str) -> dict[str, tuple[list[tuple[int, int]], list[dict]]]:
    """id -> (image sizes in placeholder order, LLaVA conversation) of what ``write_format(fmt)`` wrote."""
    out = {sid: ([size], expected_conversation(turns)) for sid, (size, _, turns) in SAMPLES.items()}
    if fmt in ("llava_json", "sharegpt4v_jsonl", "messages_jsonl"):
        ((q, a),) = TEXT_ONLY
        out["text-only"] = ([], [{"from": "human", "value": q}, {"from": "gpt", "value": a}])
    if fmt == "messages_jsonl":
        two = [{"from": "human", "value": "<image>\n<image>\nCompare them."}, {"from": "gpt", "value": "Different."}]
        out["two-images"] = ([SAMPLES["cat-01"][0], SAMPLES["dog-02"][0]], two)
    return out


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_every_format_converts_and_round_trips_through_the_data_module(fmt, tmp_path, processor):
    inputs, root = write_format(fmt, tmp_path / "src")
    expected_all = expected_samples(fmt)
    out = tmp_path / "shards"
    manifest = convert(
        [str(p) for p in inputs], str(out), image_root=str(root), workers=1, samples_per_shard=2, log=quiet
    )
    # Text-only and several-image samples convert too: every record is written.
    assert manifest["counts"]["written"] == manifest["counts"]["records"] == len(expected_all)
    assert rejects(out) == {}

    dm = ShardDataModule(shard_files(out), shard_files(out), processor, batch_size=2, num_workers=0)
    count = visual_token_counter(processor)
    seen = []
    for batch in dm.val_dataloader():
        for i, record in enumerate(batch["records"]):
            sizes, conversation = expected_all[record["id"]]
            assert record["conversations"] == conversation
            n = int(batch["attention_mask"][i].sum())
            images = sample_images(batch, i)
            assert [(p.shape[-1], p.shape[-2]) for p in images] == sizes  # the images that went in, in order
            counts = [count(*p.shape[-2:]) for p in images]
            expected = encode_conversation(conversation, processor.tokenizer, counts)
            assert batch["input_ids"][i, :n].tolist() == expected.input_ids.tolist()
            assert batch["loss_mask"][i, :n].tolist() == expected.loss_mask.tolist()
            key = batch["keys"][i]
            names = record["images"]  # the member names, in placeholder order
            if len(sizes) == 1:
                assert names[0] in (f"{key}.jpg", f"{key}.png")
            else:
                assert [name.rsplit(".", 1)[0] for name in names] == [f"{key}.{j}" for j in range(len(sizes))]
            seen.append(record["id"])
    assert sorted(seen) == sorted(expected_all)  # each sample exactly once
    assert not dm.val_bad_samples.bad


def test_corrupt_inputs_land_in_rejects_with_their_reason(tmp_path):
    root = tmp_path / "images"
    rel = write_images(root)
    good_jpeg = (root / rel["cat-01"]).read_bytes()
    (root / "garbage.jpg").write_bytes(b"this is not an image")
    (root / "cut.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "tiny.png").write_bytes(image_bytes((4, 4), (1, 2, 3), "PNG"))
    ok = expected_conversation(SAMPLES["cat-01"][2])

    def llava(sid, image, conv=ok):
        return {"id": sid, "image": image, "conversations": conv}

    human, gpt = ok
    long_answer = {"from": "gpt", "value": " ".join(["a long answer that keeps on going"] * 60)}
    records = [
        llava("good", rel["cat-01"]),
        llava("missing", "coco/nope.jpg"),
        llava("garbage", "garbage.jpg"),
        llava("cut", "cut.jpg"),
        llava("order", rel["cat-01"], [gpt, human]),
        llava("twice", rel["cat-01"], [human, human, gpt]),
        llava("empty", rel["cat-01"], [human, {"from": "gpt", "value": "  "}]),
        llava("unanswered", rel["cat-01"], [human]),
        llava("no-placeholder", rel["cat-01"], [{"from": "human", "value": "What is it?"}, gpt]),
        llava("robot", rel["cat-01"], [{"from": "robot", "value": "<image>\nHi"}, gpt]),
        llava("remote", "https://example.com/x.jpg"),
        llava("too-long", rel["cat-01"], [human, long_answer]),
        llava("too-small", "tiny.png"),
        ["not", "an", "object"],
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(3, '{"id": "broken", "image": ')  # a line that is not JSON
    system = {"role": "system", "content": "You are terse."}
    chat = [
        {
            "id": "sys",
            "messages": [system, {"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Yo"}],
            "images": [rel["cat-01"]],
        },
        {
            "id": "bad-uri",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]},
                {"role": "assistant", "content": "x"},
            ],
        },
        {
            "id": "unshown",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
            "images": [rel["cat-01"]],
        },
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    out = tmp_path / "out"
    manifest = convert(
        [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
        str(out),
        image_root=str(root),
        workers=2,  # the pool path
        target=str(EMBEDDED_TARGET),
        max_length=300,
        log=quiet,
    )
    got = rejects(out)
    assert got == {
        "missing": "missing_image",
        "garbage": "corrupt_image",
        "cut": "corrupt_image",
        "a.jsonl#3": "bad_json",
        "order": "roles_out_of_order",
        "twice": "roles_out_of_order",
        "empty": "empty_answer",
        "unanswered": "no_answer",
        "no-placeholder": "bad_conversation",
        "robot": "bad_conversation",
        "remote": "remote_image_unsupported",
        "too-long": "too_long",
        "too-small": "image_too_small",
        "a.jsonl#14": "bad_json",
        "sys": "system_message_unsupported",
        "bad-uri": "corrupt_image",
        "unshown": "bad_conversation",
    }
    counts = manifest["counts"]
    assert counts["written"] == 1 and counts["records"] == len(lines) + len(chat) == 1 + len(got)
    assert counts["skipped"] == {r: list(got.values()).count(r) for r in set(got.values())}
    first = json.loads((out / "rejects.jsonl").read_text().splitlines()[0])
    assert first == {
        "id": "missing",
        "source": "a.jsonl",
        "record": 1,
        "reason": "missing_image",
        "detail": first["detail"],
    }
    assert "nope.jpg" in first["detail"]

    again = convert(
        [str(tmp_path / "b.jsonl")],
        str(tmp_path / "out2"),
        image_root=str(root),
        drop_system=True,
        workers=1,
        log=quiet,
    )
    assert again["counts"]["written"] == 1 and "sys" not in rejects(tmp_path / "out2")


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_interrupted_conversion_resumes_to_byte_identical_output(tmp_path, monkeypatch):
    root = tmp_path / "images"
    rel = write_images(root)
    records = []
    for i in range(62):
        sid = list(SAMPLES)[i % 3]
        conv = expected_conversation(SAMPLES[sid][2])
        records.append({"id": f"r{i}", "image": rel[sid] if i % 5 else "missing.jpg", "conversations": conv})
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(records))
    args = dict(image_root=str(root), samples_per_shard=3)
    reference = convert([str(src)], str(tmp_path / "ref"), workers=1, log=quiet, **args)
    assert len(reference["shards"]) == 17 and reference["counts"]["skipped"] == {"missing_image": 13}

    out = tmp_path / "out"
    # 1) killed between publishing shard 2 and recording it: the shard is on disk, progress.json does not list it
    real_write = convert_output.write_json_atomic
    progress_writes = []

    def dies_on_second_progress(path, obj):
        if path.name == convert_output.PROGRESS:
            progress_writes.append(1)
            if len(progress_writes) == 2:
                raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(convert_output, "write_json_atomic", dies_on_second_progress)
    with pytest.raises(KeyboardInterrupt):
        convert([str(src)], str(out), workers=1, log=quiet, **args)
    monkeypatch.undo()
    assert (out / "train-000001.tar").is_file() and not (out / "manifest.json").exists()
    # 2) resumed, then interrupted in the middle of a shard; a killed writer's temporary file is left over too
    real_add = ShardOutput.add_sample
    calls = []

    def dies_mid_shard(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        real_add(self, *a, **k)

    monkeypatch.setattr(ShardOutput, "add_sample", dies_mid_shard)
    monkeypatch.setattr(convert_module, "CHUNK", 1)  # a window of 8 records: the pool's feeder waits on it
    with pytest.raises(RuntimeError, match="disk full"):
        convert([str(src)], str(out), workers=2, log=quiet, **args)  # the pool stops, nothing hangs
    monkeypatch.undo()
    (out / ".train-000004.tar.tmp-99999").write_bytes(b"half a shard")
    # 3) resumed to the end with another worker count (which does not shape the output)
    log = []
    done = convert([str(src)], str(out), workers=2, log=log.append, **args)
    assert any("resuming" in line and "2 shard(s) kept" in line for line in log)
    assert _tree(out) == _tree(tmp_path / "ref")  # shards, rejects.jsonl, manifest.json, marker: byte for byte
    assert done["shards"] == reference["shards"]
    keys = [s["__key__"] for shard in shard_files(out) for s in wds.WebDataset(shard, shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 49  # no duplicates, no gaps
    # a complete conversion rerun is a no-op
    log.clear()
    convert([str(src)], str(out), workers=1, log=log.append, **args)
    assert "already holds this conversion" in log[0] and _tree(out) == _tree(tmp_path / "ref")


def test_foreign_or_other_out_is_refused_and_left_untouched(tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps(llava_records(write_images(tmp_path / "images"))))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ForeignDirectoryError, match="not written by specvlm-lit"):
        convert([str(src)], str(foreign), image_root=str(tmp_path / "images"), workers=1, log=quiet)
    assert _tree(foreign) == {"thesis.tex": b"precious"}
    out = tmp_path / "out"
    convert([str(src)], str(out), image_root=str(tmp_path / "images"), workers=1, log=quiet)
    before = _tree(out)
    with pytest.raises(ConversionMismatch, match="samples_per_shard"):
        convert([str(src)], str(out), image_root=str(tmp_path / "images"), samples_per_shard=1, workers=1, log=quiet)
    assert _tree(out) == before
    busy = tmp_path / "busy"
    writer = ShardOutput(busy, {"inputs": []}, split="train", samples_per_shard=1)
    writer.open()  # a conversion in progress holds the directory
    with pytest.raises(UserError, match="another conversion is writing"):
        convert([str(src)], str(busy), image_root=str(tmp_path / "images"), workers=1, log=quiet)
    writer.abort()
    # the command line: one error line, exit status 1
    proc = subprocess.run(
        [sys.executable, "-m", "specvlm_lit.data.convert", str(src), "--out", str(foreign), "--workers", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert _tree(foreign) == {"thesis.tex": b"precious"}


def test_json_array_is_read_incrementally_across_chunk_boundaries(tmp_path, monkeypatch):
    records = [{"id": i, "text": "x" * (i * 7), "n": 12345 + i} for i in range(40)] + [7, "s", None]
    path = tmp_path / "a.json"
    path.write_text("\ufeff [\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    monkeypatch.setattr(convert_inputs, "_CHUNK", 5)  # every record and number straddles a chunk boundary
    assert list(iter_json_array(path)) == records
    path.write_text('[{"id": 1}, {"id": 2,, }]')
    with pytest.raises(InputFormatError, match="record 1"):
        list(iter_json_array(path))
    path.write_text('[{"id": 1} {"id": 2}]')
    with pytest.raises(InputFormatError, match="expected ','"):
        list(iter_json_array(path))


def test_format_detection_and_forcing(tmp_path):
    rel = write_images(tmp_path / "images")
    odd = tmp_path / "data.txt"
    odd.write_text(json.dumps(llava_records(rel)))
    with pytest.raises(InputFormatError, match="--format"):
        convert([str(odd)], str(tmp_path / "o1"), workers=1, log=quiet)
    images = str(tmp_path / "images")
    m = convert([str(odd)], str(tmp_path / "o2"), input_format="llava", image_root=images, workers=1, log=quiet)
    assert m["counts"]["written"] == len(SAMPLES) + 1 and m["job"]["inputs"][0]["format"] == "llava"  # + text-only
    unknown = tmp_path / "u.json"
    unknown.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(InputFormatError, match="'conversations'"):
        convert([str(unknown)], str(tmp_path / "o3"), workers=1, log=quiet)
    with pytest.raises(UserError, match="samples-per-shard"):
        convert([str(odd)], str(tmp_path / "o4"), samples_per_shard=0, log=quiet)
    with pytest.raises(SystemExit, match="^error: --samples-per-shard must be >= 1"):
        main([str(odd), "--out", str(tmp_path / "o4"), "--samples-per-shard", "0"])
    assert not (tmp_path / "o4").exists()  # argument errors come before anything is written


def test_mixed_batches_of_text_only_one_and_several_images_train_and_decode(tmp_path, processor):
    """One collated batch mixing a text-only sample, one-image samples and a two-image sample goes through a training
    step of every drafter row layout (per-image compression), and each prompt decodes losslessly with the drafter."""
    import functools

    from specvlm_lit.data.shards import collate
    from specvlm_lit.decoding.acceptance import WarpConfig
    from specvlm_lit.decoding.speculative import SpeculativeDecoder, TreeConfig
    from specvlm_lit.training.distill import OnlineDistillation

    inputs, root = write_format("messages_jsonl", tmp_path / "src")
    out = tmp_path / "shards"
    convert([str(p) for p in inputs], str(out), image_root=str(root), workers=1, log=quiet)
    dm = ShardDataModule(shard_files(out), shard_files(out), processor, batch_size=8, num_workers=0)
    samples = [dm.encoder(raw) for shard in shard_files(out) for raw in wds.WebDataset(shard, shardshuffle=False)]
    assert sorted(len(s["pixel_values"]) for s in samples) == [0, 1, 1, 1, 2]
    batch = collate(samples, pad_id=processor.tokenizer.pad_token_id)
    assert batch["image_counts"] == [len(s["pixel_values"]) for s in samples] and len(batch["pixel_values"]) == 5

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = OnlineDistillation(str(EMBEDDED_TARGET), functools.partial(torch.optim.AdamW, lr=1e-3))
    db = model.draft_batch(batch)
    target = model.target
    for i, s in enumerate(samples):  # each image's rows are replaced by its compressed rows, text rows kept
        n_img = int((s["input_ids"] == target.image_token_id).sum())
        assert db.visual_rows[i] <= n_img and (n_img > 0 or db.visual_rows[i] == 0)
    loss, _ = model._losses(db, "train")
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.drafter.parameters())

    model.drafter.eval()
    decoder = SpeculativeDecoder(target, model.drafter, TreeConfig(4, 3, 12), WarpConfig())
    eos = processor.tokenizer.eos_token_id
    for i in range(len(samples)):
        answer = int(batch["loss_mask"][i].nonzero()[0])
        ids = batch["input_ids"][i, :answer][None]
        images = sample_images(batch, i)
        feats = target.encode_images(images)
        out = decoder.generate(
            ids,
            image_features=feats,
            image_layouts=batch["layouts"][i],
            max_new_tokens=12,
            eos_token_id=eos,
        )
        kwargs = {"mm_encoder_outputs": target.as_mm_encoder_outputs(feats)} if images else {}
        ref = target.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=processor.tokenizer.pad_token_id,
            **kwargs,
        )[0, ids.shape[1] :]
        assert out.tokens.tolist() == ref.tolist()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next"])
def test_a_family_target_filters_by_its_own_encoding(family, tmp_path):
    """--target with a chat-template family: conversion rejects by the family's own token counts (its chat
    template, its processor's visual tokens), and the shards load as exactly the family's render_conversation."""
    import torch

    from specvlm_lit.targets import VisualInputs, load_prompt_builder
    from specvlm_lit.targets.processor import as_chat
    from tests.families.build import build_family

    target = build_family(family, tmp_path / family)
    builder = load_prompt_builder(target)
    root = tmp_path / "images"
    rel = write_images(root)
    records = llava_records(rel)
    (tmp_path / "data.json").write_text(json.dumps(records))

    def rendered(record):
        images = [Image.open(root / record["image"]).convert("RGB")] if "image" in record else []
        return builder.render_conversation(as_chat(record["conversations"]), images)

    lengths = {r["id"]: rendered(r).input_ids.shape[1] for r in records}
    max_length = sorted(lengths.values())[len(lengths) // 2]  # some samples fit, some do not
    assert min(lengths.values()) <= max_length < max(lengths.values())
    out = tmp_path / "out"
    manifest = convert(
        [str(tmp_path / "data.json")],
        str(out),
        image_root=str(root),
        workers=1,
        target=str(target),
        max_length=max_length,
        log=quiet,
    )
    too_long = {sid for sid, n in lengths.items() if n > max_length}
    assert rejects(out) == {sid: "too_long" for sid in too_long}
    assert manifest["counts"]["written"] == len(records) - len(too_long)

    dm = ShardDataModule(shard_files(out), shard_files(out), str(target), batch_size=1, num_workers=0)
    seen = []
    for batch in dm.val_dataloader():
        record = next(r for r in records if r["id"] == batch["records"][0]["id"])
        ref = rendered(record)
        assert batch["input_ids"][0].tolist() == ref.input_ids[0].tolist()
        assert batch["loss_mask"][0].tolist() == ref.loss_mask[0].tolist()
        if ref.visual is not None:
            assert isinstance(batch["pixel_values"], VisualInputs)
            for name, value in ref.visual.hf_kwargs().items():
                assert torch.equal(getattr(batch["pixel_values"], name), value)
        seen.append(record["id"])
    assert sorted(seen) == sorted(set(lengths) - too_long)
