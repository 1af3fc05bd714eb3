"""Target-regenerated answers (python -m specvlm_lit.data.regenerate): every answer is what the target's generate()
says in that context (earlier turns regenerated too), through plain generate() batches and through the speculative
decoder; an interrupted regeneration resumes to byte-identical shards; bad input is refused with one line."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from specvlm_lit.data import convert_output
from specvlm_lit.data.conversation import encode_conversation
from specvlm_lit.data.convert import convert
from specvlm_lit.data.datamodule import ShardDataModule
from specvlm_lit.data.regenerate import Decoding, RegenerateError, regenerate
from specvlm_lit.data.shards import sample_images
from specvlm_lit.errors import UserError
from specvlm_lit.target import TargetAdapter, visual_token_counter
from specvlm_lit.utils.atomic import ForeignDirectoryError
from tests.conftest import EMBEDDED_TARGET, REPO
from tests.helpers import write_shard
from tests.test_convert import image_bytes

MAX_NEW = 48


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Converted shards of a tiny corpus: one image, multi-turn, text only, two images (own text, drawn images)."""
    d = tmp_path_factory.mktemp("regen")
    images = d / "images"
    images.mkdir()
    for name, size, colour in (("red", (64, 64), (220, 30, 30)), ("blue", (96, 64), (30, 30, 220))):
        (images / f"{name}.png").write_bytes(image_bytes(size, colour, "PNG"))

    def turns(*pairs):
        return [m for q, a in pairs for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]

    records = [
        {"id": "one", "image": "red.png", "conversations": turns(("<image>\nWhat color is the square?", "Red."))},
        {
            "id": "multi",
            "image": "blue.png",
            "conversations": turns(("<image>\nDescribe the image.", "Blue."), ("How many shapes are there?", "One.")),
        },
        {"id": "text", "conversations": turns(("What color is the sky?", "Blue."))},
        {
            "id": "two",
            "image": ["red.png", "blue.png"],
            "conversations": turns(("<image>\n<image>\nWhich image is blue?", "The second.")),
        },
    ]
    (d / "data.json").write_text(json.dumps(records))
    convert(
        [str(d / "data.json")], str(d / "shards"), image_root=str(images), samples_per_shard=2, workers=1, log=quiet
    )
    return d / "shards"


@pytest.fixture(scope="module")
def target():
    from transformers import AutoProcessor

    return TargetAdapter.from_pretrained(EMBEDDED_TARGET), AutoProcessor.from_pretrained(EMBEDDED_TARGET)


def shards_of(d: Path) -> list[str]:
    return [str(p) for p in sorted(d.glob("train-*.tar"))]


def reference_answers(target, record: dict, pixels: list) -> list[list[int]] | None:
    """The answers HF generate() gives turn by turn (batch 1, greedy), each turn seeing the earlier generated answers;
    None when one does not end within MAX_NEW tokens."""
    adapter, processor = target
    tok = processor.tokenizer
    count = visual_token_counter(processor)
    questions = [m["value"] for m in record["conversations"] if m["from"] == "human"]
    context, answers = [], []
    for q in questions:
        conv = [*context, {"from": "human", "value": q}]
        n_images = sum(m["value"].count("<image>") for m in conv if m["from"] == "human")
        counts = [count(*p.shape[-2:]) for p in pixels[:n_images]]
        ids = encode_conversation(conv, tok, counts, add_generation_prompt=True).input_ids[None]
        kwargs = {}
        if n_images:
            kwargs["mm_encoder_outputs"] = adapter.as_mm_encoder_outputs(adapter.encode_images(pixels[:n_images]))
        out = adapter.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **kwargs,
        )[0, ids.shape[1] :].tolist()
        if tok.eos_token_id not in out:
            return None
        answer = out[: out.index(tok.eos_token_id)]
        answers.append(answer)
        context = [*conv, {"from": "gpt", "value": tok.decode(answer)[1:]}]
    return answers


@pytest.fixture(scope="module")
def regenerated(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("regen_out") / "out"
    manifest = regenerate(
        shards_of(corpus),
        str(out),
        target=str(EMBEDDED_TARGET),
        decoding=Decoding(max_new_tokens=MAX_NEW, batch_size=3),  # batches of 3: left padding, one partial batch
        samples_per_shard=1,
        log=quiet,
    )
    return out, manifest


def test_regenerated_answers_are_the_targets_generate_outputs(corpus, regenerated, target):
    out, manifest = regenerated
    adapter, processor = target
    tok = processor.tokenizer
    source_manifest = corpus / "manifest.json"
    job = manifest["job"]
    assert job["source_manifests"][0]["sha256"] == convert_output.sha256_file(source_manifest)
    assert job["target"]["fingerprint"] == adapter.fingerprint()
    assert job["decoding"] == {
        "method": "generate",
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 0,
        "max_new_tokens": MAX_NEW,
        "batch_size": 3,
    }
    dm = ShardDataModule(shards_of(corpus), shards_of(corpus), processor, batch_size=1, num_workers=0)
    expected = {}
    for batch in dm.val_dataloader():  # the source samples, as the loader reads them
        record = batch["records"][0]
        expected[record["id"]] = reference_answers(target, record, sample_images(batch, 0))
    assert set(expected) == {"one", "multi", "text", "two"}
    rejected = {e["id"]: e["reason"] for e in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejected == {sid: "answer_unfinished" for sid, a in expected.items() if a is None}
    assert manifest["counts"]["written"] == sum(a is not None for a in expected.values()) >= 2

    # The regenerated shards stream through the data module; the tokens learned are the target's, EOS after each.
    dm = ShardDataModule(shards_of(out), shards_of(out), processor, batch_size=1, num_workers=0)
    seen = []
    for batch in dm.val_dataloader():
        record = batch["records"][0]
        answers = expected[record["id"]]
        learned = batch["input_ids"][0][batch["loss_mask"][0]].tolist()
        assert learned == [t for a in answers for t in (*a, tok.eos_token_id)]
        assert [m["from"] for m in record["conversations"]] == ["human", "gpt"] * len(answers)
        assert record["regenerated_from"]["shard"].startswith("train-")
        seen.append(record["id"])
    assert sorted(seen) == sorted(sid for sid, a in expected.items() if a is not None)
    assert manifest["counts"]["notes"] == {"answers_retokenized_differently": 0}


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_speculative_decoder_gives_the_same_shards(corpus, regenerated, tmp_path, target):
    from specvlm_lit.drafter.eagle import EagleVLMDrafter, save_atomically

    torch.manual_seed(0)
    drafter = save_atomically(EagleVLMDrafter.for_target(target[0], compressor={"type": "select"}), tmp_path / "d")
    out = tmp_path / "spec"
    manifest = regenerate(
        shards_of(corpus),
        str(out),
        target=str(EMBEDDED_TARGET),
        drafter=str(drafter),
        decoding=Decoding(max_new_tokens=MAX_NEW, batch_size=3),
        samples_per_shard=1,
        log=quiet,
    )
    assert manifest["job"]["decoding"]["method"] == "speculative" and manifest["job"]["drafter"]["sha256"]
    reference = _tree(regenerated[0])
    got = _tree(out)
    assert {k: v for k, v in got.items() if k != "manifest.json"} == {
        k: v for k, v in reference.items() if k != "manifest.json"
    }  # greedy speculative decoding is lossless: the same answers, byte for byte


def test_interrupted_regeneration_resumes_to_byte_identical_shards(corpus, tmp_path, monkeypatch):
    args = dict(
        target=str(EMBEDDED_TARGET),
        decoding=Decoding(temperature=1.0, seed=3, max_new_tokens=MAX_NEW, batch_size=2),  # sampled, seeded
        samples_per_shard=1,
        log=quiet,
    )
    ref = regenerate(shards_of(corpus), str(tmp_path / "ref"), **args)
    real_write = convert_output.write_json_atomic
    writes = []

    def dies_on_second_progress(path, obj):
        if path.name == convert_output.PROGRESS:
            writes.append(1)
            if len(writes) == 2:
                raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(convert_output, "write_json_atomic", dies_on_second_progress)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        regenerate(shards_of(corpus), str(out), **args)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    log = []
    done = regenerate(shards_of(corpus), str(out), **{**args, "log": log.append})
    assert any("resuming" in line for line in log)
    assert _tree(out) == _tree(tmp_path / "ref") and done["shards"] == ref["shards"]
    keys = [s["__key__"] for shard in shards_of(out) for s in wds.WebDataset(shard, shardshuffle=False)]
    assert len(keys) == len(set(keys)) == ref["counts"]["written"]


def test_bad_inputs_are_rejected_by_reason_or_refused(corpus, tmp_path):
    good = next(iter(wds.WebDataset(shards_of(corpus)[0], shardshuffle=False)))
    members = {k: v for k, v in good.items() if not k.startswith("__")}
    shard = write_shard(
        tmp_path / "mixed-000000.tar",
        [
            ("a", members | {"json": json.dumps(json.loads(good["json"]) | {"images": ["a.png"]}).encode()}),
            ("b", {"json": b"{not json"}),
            (
                "c",
                {
                    "json": json.dumps(
                        {"images": ["c.png"], "conversations": [{"from": "human", "value": "<image>\nHi"}]}
                    ).encode()
                },
            ),
        ],
    )
    cut = tmp_path / "cut-000000.tar"
    with tarfile.open(shards_of(corpus)[0]) as tf:
        image = tf.getmembers()[1]  # the first sample's image, after its json
    cut.write_bytes(Path(shards_of(corpus)[0]).read_bytes()[: image.offset_data + image.size // 2])
    out = tmp_path / "out"
    manifest = regenerate(
        [str(shard), str(cut)], str(out), target=str(EMBEDDED_TARGET), decoding=Decoding(max_new_tokens=2), log=quiet
    )
    reasons = [json.loads(line)["reason"] for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reasons == ["answer_unfinished", "bad_json", "missing_image", "corrupt_tar"]
    assert manifest["counts"]["written"] == 0 and manifest["counts"]["records"] == 4

    def run(**kw):
        return regenerate(
            shards_of(corpus), str(tmp_path / "x"), **{"target": str(EMBEDDED_TARGET), "log": quiet, **kw}
        )

    with pytest.raises(UserError, match="do not exist"):
        regenerate([str(tmp_path / "nope-{000000..000001}.tar")], str(tmp_path / "x"), target=str(EMBEDDED_TARGET))
    with pytest.raises(RegenerateError, match="--batch-size"):
        run(decoding=Decoding(batch_size=0))
    with pytest.raises(RegenerateError, match="temperature"):
        run(decoding=Decoding(temperature=-1.0))
    with pytest.raises(RegenerateError, match="--target"):
        run(target=str(tmp_path / "no-target"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ForeignDirectoryError):
        regenerate(shards_of(corpus), str(foreign), target=str(EMBEDDED_TARGET), log=quiet)
    assert _tree(foreign) == {"notes.txt": b"keep"}
    proc = subprocess.run(
        [sys.executable, "-m", "specvlm_lit.data.regenerate", *shards_of(corpus), "--out", str(foreign)]
        + ["--target", str(EMBEDDED_TARGET), "--max-new-tokens", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert (
        proc.returncode == 1
        and proc.stderr.startswith("error: --max-new-tokens")
        and len(proc.stderr.splitlines()) == 1
    )
