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


def turns_of(*pairs):
    """LLaVA turns of (question, answer) pairs."""
    return [m for q, a in pairs for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


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


# ------------------------------------------------------------------------------------- a chat-template family target
QWEN_RECORDS = [
    {"id": "q-one", "conversations": turns_of(("<image>\nWhat is shown in the image?", "A red square."))},
    {
        "id": "q-multi",
        "conversations": turns_of(("<image>\nDescribe the picture.", "Two cats."), ("And the colour?", "Grey.")),
    },
    {"id": "q-two", "conversations": turns_of(("<image>\n<image>\nCompare both images.", "The left one."))},
    {"id": "q-text", "conversations": turns_of(("How many objects are there?", "Two."))},
]
QWEN_IMAGES = {"q-one": [(50, 40)], "q-multi": [(40, 90)], "q-two": [(50, 40), (64, 64)], "q-text": []}


def qwen_reference(path: Path, record: dict, images: list, max_new: int) -> list[list[int]] | str:
    """Hugging Face's own path, turn by turn: the chat template (generation prompt included) rendered as text, HF's
    Qwen2.5-VL processor on it and the images, ``model.generate()`` (greedy); the reject reason the sample must get
    when an answer does not end or holds a visual placeholder."""
    from transformers import AutoModelForImageTextToText

    from specvlm_lit.targets import load_prompt_builder
    from specvlm_lit.targets.processor import as_chat
    from tests.families.reference import hf_processor

    builder = load_prompt_builder(path)
    tok, template = builder.tokenizer, (path / "chat_template.jinja").read_text()
    hf = hf_processor("qwen2_5_vl", path, tok, builder.image_processor)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    questions = [m["value"] for m in record["conversations"] if m["from"] == "human"]
    context, answers = [], []
    for q in questions:
        conv = [*context, {"from": "human", "value": q}]
        text = tok.apply_chat_template(
            as_chat(conv), chat_template=template, tokenize=False, add_generation_prompt=True
        )
        assert text.endswith("<|im_start|>assistant\n")  # ChatML, with the generation prompt
        shown = images[: sum(m["value"].count("<image>") for m in conv if m["from"] == "human")]
        inputs = hf(text=[text], images=[shown] if shown else None, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id)
        out = out[0, inputs["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id not in out:
            return "answer_unfinished"
        answers.append(out[: out.index(tok.eos_token_id)])
        if {builder.image_token_id, builder.video_token_id} & set(answers[-1]):
            return "image_token_in_answer"
        context = [*conv, {"from": "gpt", "value": tok.decode(answers[-1])}]
    return answers


def end_answers_early(path: Path, prompts: list) -> None:
    """Random tiny weights never pick EOS: swap the lm_head rows of EOS and of the token the greedy answers to
    ``prompts`` (rendered first-turn prompts) hold most, never first, so answers end where that token came."""
    from collections import Counter

    from transformers import AutoModelForImageTextToText

    from specvlm_lit.targets import load_prompt_builder

    builder = load_prompt_builder(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    special = set(builder.tokenizer.all_special_ids) | {builder.image_token_id, builder.video_token_id}
    outputs = []
    for p in prompts:
        kwargs = p.visual.hf_kwargs() if p.visual is not None else {}
        out = model.generate(
            input_ids=p.input_ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, **kwargs
        )
        outputs.append(out[0, p.input_ids.shape[1] :].tolist())
    first = {o[0] for o in outputs}
    common = Counter(t for o in outputs for t in set(o[1:]) if t not in special | first)
    token, eos = common.most_common(1)[0][0], builder.tokenizer.eos_token_id
    with torch.no_grad():
        rows = model.lm_head.weight
        rows[[token, eos]] = rows[[eos, token]].clone()
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def qwen_regenerated(tmp_path_factory):
    """A tiny Qwen2.5-VL target, LLaVA-format shards of QWEN_RECORDS, and their regeneration with it."""
    from specvlm_lit.targets import load_prompt_builder
    from specvlm_lit.targets.processor import as_chat
    from tests.families.build import build_family
    from tests.families.reference import image

    d = tmp_path_factory.mktemp("regen_qwen")
    target = build_family("qwen2_5_vl", d / "qwen")
    images = {sid: [image(w, h, seed=k) for k, (w, h) in enumerate(sizes)] for sid, sizes in QWEN_IMAGES.items()}
    builder = load_prompt_builder(target)
    first_turns = [
        builder.render(
            as_chat(r["conversations"][:1]), images[r["id"]][: r["conversations"][0]["value"].count("<image>")]
        )
        for r in QWEN_RECORDS
    ]
    end_answers_early(target, first_turns)
    samples = []
    for r in QWEN_RECORDS:
        members = {
            "json": json.dumps(r | {"images": [f"{r['id']}.{k}.png" for k in range(len(images[r["id"]]))]}).encode()
        }
        for k, img in enumerate(images[r["id"]]):
            members[f"{k}.png"] = png_bytes(img)
        samples.append((r["id"], members))
    shard = write_shard(d / "train-000000.tar", samples)
    out = d / "out"
    manifest = regenerate(
        [str(shard)], str(out), target=str(target), decoding=Decoding(max_new_tokens=MAX_NEW, batch_size=2), log=quiet
    )
    return target, images, out, manifest


def png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_a_qwen_target_regenerates_with_its_chat_template(qwen_regenerated):
    """Prompts are the family's ChatML with the generation prompt (the reference is HF's processor on the chat
    template's text), answers are stored so the loader learns the target's tokens and ChatML's end of turn."""
    from specvlm_lit.targets import VisualInputs, load_prompt_builder

    target, images, out, manifest = qwen_regenerated
    tok = load_prompt_builder(target).tokenizer
    expected = {r["id"]: qwen_reference(target, r, images[r["id"]], MAX_NEW) for r in QWEN_RECORDS}
    kept = {sid: a for sid, a in expected.items() if not isinstance(a, str)}
    assert kept, "the tiny target must end some answers for this test"
    rejected = {e["id"]: e["reason"] for e in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejected == {sid: a for sid, a in expected.items() if isinstance(a, str)}
    dm = ShardDataModule(shards_of(out), shards_of(out), str(target), batch_size=1, num_workers=0)
    end_of_turn = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]

    def encode(answer: list[int]) -> list[int]:
        return tok(tok.decode(answer), add_special_tokens=False)["input_ids"]

    seen = []
    for batch in dm.val_dataloader():
        record = batch["records"][0]
        answers = kept[record["id"]]
        assert [m["value"] for m in record["conversations"] if m["from"] == "gpt"] == [tok.decode(a) for a in answers]
        # each answer as ChatML renders it (no space of the format's own before it), then "<|im_end|>\n"; the target's
        # very tokens where its answer text encodes back to them (random tiny weights pick non-canonical merges)
        learned = batch["input_ids"][0][batch["loss_mask"][0]].tolist()
        encoded = [encode(a) for a in answers]
        assert learned == [t for e in encoded for t in (*e, *end_of_turn)]
        if images[record["id"]]:  # the family's processor outputs, Qwen's patch grids included
            assert isinstance(batch["pixel_values"], VisualInputs) and batch["pixel_values"].image_grid_thw is not None
        else:
            assert not batch["pixel_values"]
        seen.append(record["id"])
    assert sorted(seen) == sorted(kept)
    retokenized = sum(
        any(tok(tok.decode(a), add_special_tokens=False)["input_ids"] != a for a in answers)
        for answers in kept.values()
    )
    assert manifest["counts"]["notes"] == {"answers_retokenized_differently": retokenized}


def test_a_qwen_target_regenerates_the_same_shards_with_the_speculative_decoder(qwen_regenerated, tmp_path):
    """The speculative decoder on the family's rendered prompts (processor outputs + their layouts for the drafter's
    compressor) is lossless: greedy, the shards equal the generate() path's byte for byte."""
    from specvlm_lit.drafter.base import drafter_class, save_atomically

    target, _, reference, _ = qwen_regenerated
    torch.manual_seed(0)
    drafter = tmp_path / "drafter"
    save_atomically(drafter_class("eagle_vlm").for_target(TargetAdapter.from_pretrained(target)), drafter)
    out = tmp_path / "spec"
    manifest = regenerate(
        [str(p) for p in sorted(reference.parent.glob("train-*.tar"))],
        str(out),
        target=str(target),
        drafter=str(drafter),
        decoding=Decoding(max_new_tokens=MAX_NEW, batch_size=2),
        log=quiet,
    )
    assert manifest["job"]["decoding"]["method"] == "speculative"
    got, want = _tree(out), _tree(reference)
    assert {k: v for k, v in got.items() if k != "manifest.json"} == {
        k: v for k, v in want.items() if k != "manifest.json"
    }
