import io
import json
import random
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from specvlm_lit.synthetic import HELD_OUT_PAIRS, TASKS, CorpusSpec, generate_corpus, make_sample, sample_scene
from specvlm_lit.synthetic.generate import corpus_is_current
from specvlm_lit.synthetic.scenes import validate_scene_args


def test_samples_are_deterministic():
    spec = CorpusSpec()
    assert make_sample(spec, "train", 7) == make_sample(spec, "train", 7)
    assert make_sample(spec, "train", 7)["png"] != make_sample(spec, "train", 8)["png"]


def test_held_out_pairs_only_in_test_split():
    spec = CorpusSpec()
    for split in ("train", "val", "test"):
        for i in range(150):
            pairs = {(o["colour"], o["shape"]) for o in make_sample(spec, split, i)["json"]["scene"]["objects"]}
            if split == "test":
                assert pairs & HELD_OUT_PAIRS, f"test sample {i} has no held-out pair"
            else:
                assert not pairs & HELD_OUT_PAIRS, f"{split} sample {i} leaks a held-out pair"


def test_resolutions_tasks_and_llava_format():
    spec = CorpusSpec()
    samples = [make_sample(spec, "train", i)["json"] for i in range(300)]
    assert {s["scene"]["resolution"] for s in samples} == {64, 96, 128}
    assert {t for s in samples for t in s["tasks"]} == set(TASKS)
    for s in samples:
        conv = s["conversations"]
        assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in m["value"] for m in conv[1:])
        assert len(s["checks"]) == len(s["tasks"]) == len(conv) // 2


def test_images_match_declared_resolution():
    x = make_sample(CorpusSpec(), "val", 3)
    img = Image.open(io.BytesIO(x["png"]))
    assert img.size == (x["json"]["scene"]["resolution"],) * 2 and img.mode == "RGB"


def test_detailed_descriptions_are_long(corpus_tokenizer):
    spec = CorpusSpec()
    lengths = []
    for i in range(400):
        rec = make_sample(spec, "train", i)["json"]
        for task, (_q, a) in zip(rec["tasks"], zip(rec["conversations"][::2], rec["conversations"][1::2])):
            if task == "describe":
                lengths.append(len(corpus_tokenizer(a["value"], add_special_tokens=False)["input_ids"]))
    assert lengths and min(lengths) >= 40


def test_answers_vary_in_phrasing():
    spec = CorpusSpec()
    openings = {make_sample(spec, "train", i)["json"]["conversations"][1]["value"].split()[0] for i in range(200)}
    assert len(openings) >= 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resolutions=(60,)), "multiple of the patch size"),
        (dict(resolutions=(16,)), "out of range"),
        (dict(resolutions=()), "at least one"),
        (dict(max_objects=0), "max_objects"),
        (dict(max_objects=12), "max_objects"),
        (dict(n_train=-1), "n_train"),
        (dict(n_train=0, n_val=0, n_test=0), "empty"),
        (dict(samples_per_shard=0), "samples_per_shard"),
    ],
)
def test_invalid_generator_arguments(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        generate_corpus(tmp_path / "c", CorpusSpec(**kwargs), log=lambda *_: None)
    assert not (tmp_path / "c").exists()


def test_cli_reports_bad_arguments(capsys):
    from specvlm_lit.synthetic.generate import main

    with pytest.raises(SystemExit):
        main(["--resolutions", "60"])
    assert "multiple of the patch size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--task-weights", "describe:1"])
    assert "task=weight pairs" in capsys.readouterr().err


def test_cli_passes_the_training_split_options(tmp_path, capsys):
    from dataclasses import fields

    from specvlm_lit.synthetic.generate import main

    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    assert all("--" + f.name.replace("_", "-") in usage for f in fields(CorpusSpec) if f.name != "version")

    main(
        [
            "--out",
            str(tmp_path / "c"),
            "--n-train",
            "20",
            "--n-val",
            "2",
            "--n-test",
            "2",
            "--max-turns",
            "5",
            "--task-weights",
            "describe=1,attribute=3",
            "--unnamed-colour-prob",
            "0.1",
        ]
    )
    spec = json.loads((tmp_path / "c" / "manifest.json").read_text())["spec"]
    assert spec["task_weights"] == {"describe": 1.0, "attribute": 3.0} and spec["max_turns"] == 5
    assert spec["unnamed_colour_prob"] == 0.1


def test_scene_sampler_rejects_bad_mode():
    with pytest.raises(ValueError, match="held_out"):
        sample_scene(random.Random(0), held_out="maybe")
    validate_scene_args((64, 96), 5)


def test_corpus_shards_and_manifest(small_corpus):
    assert corpus_is_current(small_corpus, CorpusSpec(n_train=120, n_val=16, n_test=32, samples_per_shard=50))
    assert not corpus_is_current(small_corpus, CorpusSpec())
    assert len(list(small_corpus.glob("train-*.tar"))) == 3
    keys = [s["__key__"] for s in wds.WebDataset(str(small_corpus / "test-000000.tar"), shardshuffle=False)]
    assert len(keys) == 32 and len(set(keys)) == 32
    with tarfile.open(small_corpus / "val-000000.tar") as tf:
        names = tf.getnames()
    assert {n.rsplit(".", 1)[1] for n in names} == {"png", "json"}
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 120, "val": 16, "test": 32}


def test_interrupted_generation_keeps_the_previous_corpus(tmp_path, monkeypatch):
    import specvlm_lit.synthetic.generate as gen

    out = tmp_path / "c"
    spec = CorpusSpec(n_train=5, n_val=1, n_test=1)
    generate_corpus(out, spec, log=lambda *_: None)
    before = sorted(p.name for p in out.iterdir())
    calls = {"n": 0}
    real = gen.make_sample

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen, "make_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(out, CorpusSpec(n_train=9, n_val=1, n_test=1), log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == before
    assert corpus_is_current(out, spec)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no half-written directory left behind


def test_unnamed_colours_name_no_colour_and_repaint_only_their_object():
    import math

    import numpy as np

    from specvlm_lit.synthetic.scenes import BACKGROUNDS, COLOURS, render, unnamed_colour

    rng = random.Random(0)
    for _ in range(50):
        c = unnamed_colour(rng)
        assert min(math.dist(c, n) for n in [*COLOURS.values(), *BACKGROUNDS.values()]) >= 90
    scene = sample_scene(random.Random(2), resolutions=(64,), min_objects=2)
    a, b = np.asarray(render(scene)), np.asarray(render(scene, {0: unnamed_colour(rng)}))
    assert (a != b).any() and np.array_equal(a, np.asarray(render(scene, {})))


def test_default_corpus_records_are_pinned():
    # The committed target was trained on this corpus: options added later must leave it unchanged.
    import hashlib

    h = hashlib.sha256()
    for split, n in (("train", 200), ("val", 50), ("test", 50)):
        for i in range(n):
            h.update(json.dumps(make_sample(CorpusSpec(), split, i)["json"], sort_keys=True).encode())
    assert h.hexdigest() == "00c1dfae042745c9d0449f110fc433893d5065bc7b4a68307eb9e11e8bfcf367"


def _named_colours(text: str) -> set[str]:
    from specvlm_lit.synthetic.scenes import COLOURS

    return {w for w in text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split() if w in COLOURS}


def _assert_last_object_painted(sample: dict, scene) -> None:
    """The rendered pixels carry the last-drawn object's fill (nothing covers its centre; earlier
    objects' centres may be covered)."""
    import numpy as np

    image = np.asarray(Image.open(io.BytesIO(sample["png"])))
    top, r = scene.objects[-1], scene.resolution
    centre = image[min(int(top.cy * r), r - 1), min(int(top.cx * r), r - 1)]
    assert np.abs(centre.astype(int) - np.array(top.fill)).max() <= 8


def test_unnamed_colour_objects_in_the_train_split_are_named_by_shape_alone():
    import math
    import re

    from specvlm_lit.synthetic.scenes import BACKGROUNDS, COLOURS, SHAPES, Scene

    spec = CorpusSpec(unnamed_colour_prob=0.3)
    for split in ("val", "test"):  # evaluation splits never change
        assert all(make_sample(spec, split, i) == make_sample(CorpusSpec(), split, i) for i in range(40))
    objects = unnamed = 0
    for i in range(400):
        sample = make_sample(spec, "train", i)
        rec = sample["json"]
        scene = Scene.from_dict(rec["scene"])
        assert Scene.from_dict(scene.to_dict()) == scene
        for o in scene.objects:
            objects += 1
            if o.colour is not None:
                assert o.paint is None and (o.colour, o.shape) not in HELD_OUT_PAIRS
                continue
            unnamed += 1
            assert min(math.dist(o.paint, c) for c in [*COLOURS.values(), *BACKGROUNDS.values()]) >= 90
        _assert_last_object_painted(sample, scene)
        named_colours = {o.colour for o in scene.objects if o.colour}
        for task, checks, (q, a) in zip(
            rec["tasks"], rec["checks"], zip(rec["conversations"][::2], rec["conversations"][1::2])
        ):
            text = q["value"] + " " + a["value"]
            # No colour word is ever attached to an unnamed object's shape: every colour+shape written is a
            # named object of the scene (bar the absent pair a "No" question asks about).
            for colour, shape in re.findall(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b", text):
                assert any(o.colour == colour and o.shape == shape for o in scene.objects) or (
                    task == "attribute" and checks[0] == "No" and f"no {colour} {shape}" in text
                )
            if task == "attribute" and checks[0] in COLOURS:  # colour questions ask about named objects only
                assert checks[0] in named_colours
            if task == "count" and _named_colours(q["value"]):  # unnamed objects never count towards a colour
                (colour,) = _named_colours(q["value"])
                n = sum(o.colour == colour for o in scene.objects)
                assert checks == [("no", "one", "two", "three", "four", "five")[n]]
            # "the cross" in a relation must pick out exactly one object.
            related = [checks[0], checks[2]] if task == "spatial" and len(checks) == 3 else []
            if task == "describe":
                # (Two named objects of one colour+shape were always possible here; only unnamed ones are new.)
                relation = r"(?:above|below|to the left of|to the right of)(?: and to the (?:left|right) of)?"
                related = [
                    n
                    for pair in re.findall(rf"The ([a-z ]+?) is {relation} the ([a-z ]+)\.", a["value"])
                    for n in pair
                    if " " not in n
                ]
            if related:
                for name in related:
                    matching = [o for o in scene.objects if o.name == name or (" " not in name and o.shape == name)]
                    assert len(matching) == 1, (name, rec["scene"])
    assert 0.2 < unnamed / objects < 0.4


def test_unnamed_colour_prob_is_validated():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="unnamed_colour_prob"):
            CorpusSpec(unnamed_colour_prob=bad).validate()


def test_task_weights_repeat_look_up_tasks_without_repeating_questions():
    spec = CorpusSpec(task_weights={"describe": 0, "attribute": 3, "count": 1, "spatial": 2}, max_turns=6)
    spec.validate()
    tasks = []
    for i in range(300):
        rec = make_sample(spec, "train", i)["json"]
        questions = [m["value"].removeprefix("<image>\n") for m in rec["conversations"][::2]]
        assert len(set(questions)) == len(questions) and len(rec["tasks"]) == len(rec["checks"]) == len(questions)
        tasks += rec["tasks"]
    counts = {t: tasks.count(t) for t in TASKS}
    assert counts["describe"] == 0 and counts["attribute"] > counts["spatial"] > counts["count"] > 0
    assert len(tasks) / 300 > 2.5  # more turns per image than the default 1..3 distinct ones
    for split in ("val", "test"):  # single-turn, evenly drawn, unchanged
        assert all(make_sample(spec, split, i) == make_sample(CorpusSpec(), split, i) for i in range(30))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_turns=5), "needs repeated tasks"),
        (dict(task_weights={"describe": 1, "caption": 2}), "task_weights"),
        (dict(task_weights={"describe": 0, "count": 0}), "task_weights"),
        (dict(task_weights={"count": -1, "spatial": 2}), "task_weights"),
    ],
)
def test_bad_task_mix_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CorpusSpec(**kwargs).validate()


def test_a_corpus_written_before_a_new_option_existed_is_still_current(small_corpus, tmp_path):
    # Its manifest lacks the option; the corpus was generated as if at the default, so no rebuild.
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    del manifest["spec"]["unnamed_colour_prob"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    spec = dict(n_train=120, n_val=16, n_test=32, samples_per_shard=50)
    assert corpus_is_current(tmp_path, CorpusSpec(**spec))
    assert not corpus_is_current(tmp_path, CorpusSpec(**spec, unnamed_colour_prob=0.2))
    assert not corpus_is_current(tmp_path, CorpusSpec(**{**spec, "n_train": 121}))


@pytest.mark.parametrize("retired, current", [(0.0, True), (False, True), (None, True), (0.4, False), (True, False)])
def test_a_corpus_written_with_a_since_removed_option(small_corpus, tmp_path, retired, current):
    # Removed options (such as extra_colour_prob) were off at a falsy value: off, the corpus is today's.
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    manifest["spec"]["extra_colour_prob"] = retired
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert corpus_is_current(tmp_path, CorpusSpec(n_train=120, n_val=16, n_test=32, samples_per_shard=50)) is current
