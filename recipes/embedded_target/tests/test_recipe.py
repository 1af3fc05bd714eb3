"""The target recipe end to end on a tiny model (Hydra compose, a few steps): builds, saves, loads, evaluates."""

import json

import pytest
import webdataset as wds
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from recipes.embedded_target.evaluate import answer_is_correct
from specvlm_lit.target import TargetAdapter
from tests.conftest import REPO, build_tiny_target


@pytest.fixture(scope="module")
def tiny_build(small_corpus, tmp_path_factory):
    # small_corpus was generated with samples_per_shard=50; the recipe must reuse, not regenerate, it.
    out = tmp_path_factory.mktemp("target") / "tiny_target"
    return out, build_tiny_target(small_corpus, out)


def test_recipe_builds_a_loadable_target(tiny_build):
    out, report = tiny_build
    assert report["steps"] == 3 and report["heldout_eval"]["samples"] == 2
    for name in ("config.json", "model.safetensors", "processor_config.json", "build_report.json"):
        assert (out / name).is_file(), name
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
    processor = AutoProcessor.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    TargetAdapter.from_pretrained(out).check_tokenizer(processor.tokenizer)
    assert json.loads((out / "build_report.json").read_text())["parameters"] == sum(
        p.numel() for p in model.parameters()
    )


def test_answer_checker():
    scene = {"objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]}
    ok = (
        "The image shows two shapes on a black background. There is a small red circle at the top. "
        "A large blue square sits on the left."
    )
    assert answer_is_correct(ok, ["two", "red circle", "blue square"], "describe", scene)
    assert not answer_is_correct(
        ok.replace("blue square", "green square"), ["two", "red circle", "blue square"], "describe", scene
    )
    hallucinated = ok + " There is a pink cross on the right."
    assert not answer_is_correct(hallucinated, ["two", "red circle", "blue square"], "describe", scene)
    assert answer_is_correct("Yes, there is a small red circle.", ["Yes"], "attribute", scene)
    assert not answer_is_correct("No, there is none.", ["Yes"], "attribute", scene)
    assert not answer_is_correct("There are twenty circles.", ["two"], "count", scene)


def test_build_report_records_stage1(tiny_build):
    _, report = tiny_build
    acc = report["vision_pretrain"]["heldout_patch_accuracy"]
    assert {"vision_val/acc_colour", "vision_val/acc_object_shape"} <= set(acc)


def _tiny_config(tokenizer_dir):
    from recipes.embedded_target.recipe import build_target_config

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=8
    )
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    return build_target_config(AutoTokenizer.from_pretrained(tokenizer_dir), vision, text), vision


def test_stage2_keeps_a_pretrained_tower_frozen(tiny_build):
    import torch

    from recipes.embedded_target.recipe import TargetPretraining
    from recipes.embedded_target.vision_pretrain import VisionPretraining

    out, _ = tiny_build
    config, vision = _tiny_config(out)
    tower = VisionPretraining(vision).tower.state_dict()
    module = TargetPretraining(config, vision_state=tower, freeze_vision=True)
    assert all(torch.equal(v, tower[k]) for k, v in module.model.model.vision_tower.state_dict().items())
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and not any("vision_tower" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    with pytest.raises(ValueError, match="vision_pretrain.steps"):
        TargetPretraining(config, freeze_vision=True)


def test_tower_from_target_checks_its_shape(tiny_build, tmp_path):
    from recipes.embedded_target.build import tower_from_target

    out, _ = tiny_build
    built = LlavaForConditionalGeneration.from_pretrained(out)
    state = tower_from_target(out, built.config.vision_config)
    assert set(state) == set(built.model.vision_tower.state_dict())
    config, _ = _tiny_config(out)
    config.vision_config.hidden_size = 48
    with pytest.raises(ValueError, match="hidden_size"):
        tower_from_target(out, config.vision_config)
    with pytest.raises(FileNotFoundError, match="build it first"):
        tower_from_target(tmp_path / "nothing", built.config.vision_config)


def test_assistant_recipe_shares_the_targets_tokenizer_and_tower(tiny_build, small_corpus, tmp_path):
    import torch
    from hydra import compose, initialize_config_dir

    from recipes.embedded_target.build import CONF_DIR, run_build
    from tests.conftest import TINY_TARGET_OVERRIDES

    target_dir, _ = tiny_build
    out = tmp_path / "assistant"
    overrides = [o for o in TINY_TARGET_OVERRIDES if not o.startswith(("model.text", "vision_pretrain"))] + [
        f"out_dir={out}",
        f"log_dir={tmp_path / 'logs'}",
        f"corpus.dir={small_corpus}",
        "corpus.n_train=120",
        "corpus.n_val=16",
        "corpus.n_test=32",
        "corpus.samples_per_shard=50",
        f"tokenizer.from_dir={target_dir}",
        f"vision_pretrain.from_target={target_dir}",
        "model.text.hidden_size=16",
        "model.text.intermediate_size=32",
        "model.text.num_hidden_layers=1",
        "model.text.num_attention_heads=2",
        "model.text.num_key_value_heads=2",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="assistant_recipe", overrides=overrides)
    assert cfg.freeze_vision
    report = run_build(cfg)
    assert report["vision_pretrain"] == {"from_target": str(target_dir)}
    assistant, target = (LlavaForConditionalGeneration.from_pretrained(d) for d in (out, target_dir))
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(target_dir).get_vocab()
    ours, theirs = assistant.model.vision_tower.state_dict(), target.model.vision_tower.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # frozen: unchanged by stage 2
    assert assistant.config.text_config.num_hidden_layers == 1


def test_stage1_batches_hide_the_colour_of_repainted_objects(tiny_build):
    import torch

    from recipes.embedded_target.patch_labels import OCCUPANCY_GRID, PATCH_LABEL_CLASSES
    from recipes.embedded_target.vision_pretrain import OBJECT_LABEL_CLASSES, ScenePatchBatches

    out, _ = tiny_build
    processor = AutoProcessor.from_pretrained(out)
    plain, repainted = (
        next(
            iter(
                ScenePatchBatches(
                    processor.image_processor,
                    batch_size=6,
                    resolutions=(64,),
                    patch_size=8,
                    seed=3,
                    unnamed_colour_prob=p,
                )
            )
        )
        for p in (0.0, 1.0)
    )
    assert plain["pixel_values"].shape == (6, 3, 64, 64)
    assert set(PATCH_LABEL_CLASSES) | set(OBJECT_LABEL_CLASSES) | {"instance", "occupancy"} <= set(plain)
    assert plain["occupancy"].shape == (6, 64, OCCUPANCY_GRID**2)
    objects = plain["instance"] > 0
    # Same scenes (same seed), but every object repainted: no colour label on object patches, the rest kept.
    assert (plain["colour"][objects] > 0).all() and (repainted["colour"][objects] == -100).all()
    assert (repainted["colour"][~objects] == 0).all()
    for k in ("shape", "cell", "centre", "occupancy", "object_shape"):
        assert torch.equal(plain[k], repainted[k]), k
    assert not torch.equal(plain["pixel_values"], repainted["pixel_values"])


def test_stage1_cli_tower_feeds_a_build(tiny_build, small_corpus, tmp_path):
    """Stage 1 alone saves a loadable tower; a build with from_tower takes it unchanged (frozen)."""
    import torch
    from hydra import compose, initialize_config_dir

    from recipes.embedded_target.build import CONF_DIR, run_build
    from recipes.embedded_target.tokenizer import build_image_processor
    from recipes.embedded_target.vision_pretrain import load_tower, run_stage1
    from tests.conftest import TINY_TARGET_OVERRIDES

    common = [
        f"log_dir={tmp_path / 'logs'}",
        f"corpus.dir={small_corpus}",
        "corpus.n_train=120",
        "corpus.n_val=16",
        "corpus.n_test=32",
        "corpus.samples_per_shard=50",
    ] + TINY_TARGET_OVERRIDES
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="target_recipe", overrides=common)
        tower_dir = tmp_path / "logs" / "vision_tower"
        assert cfg.vision_pretrain.save_to == str(tower_dir)
        state, report = run_stage1(cfg, build_image_processor())
        again, _ = run_stage1(cfg, build_image_processor())  # seeded: the build and the CLI agree
        assert all(torch.equal(state[k], again[k]) for k in state)
        saved, saved_report = load_tower(
            tower_dir, LlavaForConditionalGeneration.from_pretrained(tiny_build[0]).config.vision_config
        )
        assert all(torch.equal(saved[k], state[k]) for k in state)
        assert saved_report["steps"] == 2 and "vision_val/acc_object_shape" in saved_report["heldout_patch_accuracy"]
        cfg = compose(
            config_name="target_recipe",
            overrides=common
            + [f"out_dir={tmp_path / 'target'}", f"vision_pretrain.from_tower={tower_dir}", "freeze_vision=true"],
        )
    built = run_build(cfg)
    assert built["vision_pretrain"]["from_tower"] == str(tower_dir) and built["vision_pretrain"]["steps"] == 2
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "target")
    ours = model.model.vision_tower.state_dict()
    # Saved in bf16: the frozen tower comes back equal up to that rounding.
    assert all(torch.equal(ours[k], state[k].to(torch.bfloat16).float()) for k in state)


def test_load_tower_explains_what_is_wrong(tiny_build, tmp_path):
    from recipes.embedded_target.vision_pretrain import load_tower, save_tower

    out, _ = tiny_build
    vision = LlavaForConditionalGeneration.from_pretrained(out).config.vision_config
    with pytest.raises(FileNotFoundError, match="run stage 1 first"):
        load_tower(tmp_path / "nothing", vision)
    shape = {
        k: getattr(vision, k)
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
        )
    }
    from transformers import CLIPVisionConfig, CLIPVisionModel

    wider = {**shape, "hidden_size": 2 * shape["hidden_size"]}
    save_tower(CLIPVisionModel(CLIPVisionConfig(**wider)).state_dict(), wider, tmp_path / "tower", {})
    with pytest.raises(ValueError, match="from_tower.*hidden_size"):
        load_tower(tmp_path / "tower", vision)


def test_init_from_continues_a_built_target(tiny_build, small_corpus, tmp_path):
    """init_from takes every weight and the tokenizer of a built target and adds its steps to steps_total."""
    import torch
    from hydra import compose, initialize_config_dir

    from recipes.embedded_target.build import CONF_DIR, run_build
    from tests.conftest import TINY_TARGET_OVERRIDES

    source_dir, source_report = tiny_build
    common = [
        f"log_dir={tmp_path / 'logs'}",
        f"corpus.dir={small_corpus}",
        "corpus.n_train=120",
        "corpus.n_val=16",
        "corpus.n_test=32",
        "corpus.samples_per_shard=50",
        f"init_from={source_dir}",
    ] + TINY_TARGET_OVERRIDES
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        # lr 0: the continued model must come out exactly as it went in.
        cfg = compose(config_name="target_recipe", overrides=common + [f"out_dir={tmp_path / 'same'}", "optim.lr=0"])
        bad = compose(
            config_name="target_recipe",
            overrides=common + [f"out_dir={tmp_path / 'bad'}", "model.text.num_hidden_layers=3"],
        )
    report = run_build(cfg)
    assert report["init_from"] == {"path": str(source_dir), "steps_total": source_report["steps"]}
    assert report["steps_total"] == source_report["steps"] + report["steps"]
    assert "vision_pretrain" not in report  # stage 1 is not rerun
    before, after = (
        LlavaForConditionalGeneration.from_pretrained(d).state_dict() for d in (source_dir, tmp_path / "same")
    )
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "same").get_vocab()
        == AutoTokenizer.from_pretrained(source_dir).get_vocab()
    )
    with pytest.raises(ValueError, match="init_from.*num_hidden_layers"):
        run_build(bad)
    with pytest.raises(FileNotFoundError, match="init_from: no built target"):
        from recipes.embedded_target.build import init_weights

        init_weights(tmp_path / "nothing", None)


def test_object_naming_separates_held_out_pairs():
    from recipes.embedded_target.evaluate import object_naming
    from specvlm_lit.synthetic.scenes import HELD_OUT_PAIRS

    held = sorted(HELD_OUT_PAIRS)[0]
    seen = next((c, s) for c in ("red", "blue") for s in ("square", "cross") if (c, s) not in HELD_OUT_PAIRS)
    scene = {"objects": [{"colour": held[0], "shape": held[1]}, {"colour": seen[0], "shape": seen[1]}]}
    assert object_naming(f"There is a small {seen[0]} {seen[1]} and a {held[0]} blob.", scene) == [
        (True, False),
        (False, True),
    ]
    assert object_naming(f"A {held[0]} {held[1]}s sits next to a {seen[0]} {seen[1]}.", scene) == [
        (True, False),
        (False, True),
    ]
    assert object_naming(f"A {held[0]} {held[1]} sits next to a {seen[0]} {seen[1]}.", scene) == [
        (True, True),
        (False, True),
    ]


def test_question_kind_names_how_each_generated_question_asks():
    import random

    from recipes.embedded_target.evaluate import question_kind
    from specvlm_lit.synthetic.scenes import sample_scene
    from specvlm_lit.synthetic.tasks import make_turn

    rng = random.Random(0)
    kinds = set()
    for _ in range(400):
        scene = sample_scene(rng, held_out="require")
        for task in ("attribute", "count", "spatial"):
            turn = make_turn(task, scene, rng)
            kind = question_kind(task, turn["checks"], turn["question"])
            assert kind.startswith(task + "/")
            kinds.add(kind)
            if kind == "count/total":
                assert (
                    "total" in turn["question"] or "all the" in turn["question"] or "objects does" in turn["question"]
                )
            if kind == "attribute/exists-yes":
                assert turn["answer"].startswith("Yes")
            if kind == "spatial/relation":
                assert (
                    "relative" in turn["question"]
                    or "compared" in turn["question"]
                    or "left, right" in turn["question"]
                )
    assert kinds == {
        "attribute/colour",
        "attribute/shape",
        "attribute/exists-yes",
        "attribute/exists-no",
        "count/colour",
        "count/shape",
        "count/total",
        "spatial/relation",
        "spatial/cell",
    }


def test_evaluate_cli_reports_object_naming(tiny_build, small_corpus):
    import subprocess
    import sys

    out, _ = tiny_build
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.embedded_target.evaluate",
            f"target_dir={out}",
            f"corpus_dir={small_corpus}",
            "split=val",
            "limit=4",
            "max_new_tokens=8",
            f"hydra.run.dir={out.parent / 'eval'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout[run.stdout.index("{") :])
    assert report["split"] == "val" and report["samples"] == 4
    assert set(report["describe_objects_named"]) == {"seen", "held_out"}
    assert sum(v["n"] for v in report["per_kind"].values()) == 4
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.embedded_target.evaluate",
            f"target_dir={out}",
            "split=dev",
            f"hydra.run.dir={out.parent / 'eval'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert bad.returncode != 0 and "split='dev'" in bad.stderr


def test_build_rejects_two_tower_sources(tiny_build, small_corpus, tmp_path):
    from hydra import compose, initialize_config_dir

    from recipes.embedded_target.build import CONF_DIR, run_build
    from tests.conftest import TINY_TARGET_OVERRIDES

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="target_recipe",
            overrides=TINY_TARGET_OVERRIDES
            + [
                f"corpus.dir={small_corpus}",
                f"out_dir={tmp_path / 'x'}",
                f"init_from={tiny_build[0]}",
                f"vision_pretrain.from_tower={tmp_path / 'tower'}",
            ],
        )
    with pytest.raises(ValueError, match="from_tower and init_from are both set"):
        run_build(cfg)
    assert not (tmp_path / "x").exists()


def test_stage2_starts_from_the_same_state_with_or_without_stage1_in_process(small_corpus, tmp_path):
    """One-command build == stage-1 CLI + from_tower build (lr 0, so the saved weights are the initial ones)."""
    import torch
    from hydra import compose, initialize_config_dir

    from recipes.embedded_target.build import CONF_DIR, run_build
    from tests.conftest import TINY_TARGET_OVERRIDES

    common = TINY_TARGET_OVERRIDES + [
        f"corpus.dir={small_corpus}",
        "corpus.n_train=120",
        "corpus.n_val=16",
        "corpus.n_test=32",
        "corpus.samples_per_shard=50",
        "optim.lr=0",
        f"log_dir={tmp_path / 'logs'}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        inline = compose(config_name="target_recipe", overrides=common + [f"out_dir={tmp_path / 'inline'}"])
        split = compose(
            config_name="target_recipe",
            overrides=common
            + [f"out_dir={tmp_path / 'split'}", f"vision_pretrain.from_tower={tmp_path / 'logs' / 'vision_tower'}"],
        )
    run_build(inline)  # also saves its stage-1 tower to logs/vision_tower
    run_build(split)
    a, b = (LlavaForConditionalGeneration.from_pretrained(tmp_path / d).state_dict() for d in ("inline", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_swap_attribute_words_changes_only_answer_attribute_inputs():
    import torch

    from recipes.embedded_target.recipe import swap_attribute_words

    colours, shapes = [10, 11, 12], [20, 21]
    ids = torch.tensor([[10, 20, 5, 11, 21, 6, 12, 20, 7] * 50])
    answer = torch.ones_like(ids, dtype=torch.bool)
    answer[:, :9] = False  # the first copy plays the prompt: never touched
    gen = torch.Generator().manual_seed(0)
    noisy = swap_attribute_words(ids, answer, [colours, shapes], 0.5, generator=gen)
    changed = noisy != ids
    assert not changed[:, :9].any()
    assert not changed[~torch.isin(ids, torch.tensor(colours + shapes))].any()  # other words never change
    for group in (colours, shapes):
        at = torch.isin(ids, torch.tensor(group))
        assert torch.isin(noisy[at], torch.tensor(group)).all()  # a colour stays a colour, a shape a shape
    rate = changed[answer & torch.isin(ids, torch.tensor(colours + shapes))].float().mean().item()
    assert 0.4 < rate < 0.6  # every hit is a different word, so the change rate is p
    assert torch.equal(swap_attribute_words(ids, answer, [colours, shapes], 0.0), ids)


def test_attribute_swap_feeds_noisy_inputs_but_scores_clean_labels(tiny_build, monkeypatch):
    import torch

    from recipes.embedded_target import recipe

    config = LlavaForConditionalGeneration.from_pretrained(tiny_build[0]).config
    module = recipe.TargetPretraining(config, attribute_swap_p=0.9, attribute_groups=[[3, 4]])
    seen = {}

    def fake_forward(self, batch, input_ids=None):
        seen["input"] = input_ids
        return torch.zeros(*batch["input_ids"].shape, 8, requires_grad=True)

    def fake_loss(logits, gold, mask):
        seen["gold"] = gold
        return logits.sum(), torch.tensor(0.0)

    monkeypatch.setattr(recipe.TargetPretraining, "forward", fake_forward)
    monkeypatch.setattr(recipe.TargetPretraining, "log_dict", lambda self, *a, **k: None)
    monkeypatch.setattr(recipe, "answer_loss", fake_loss)
    ids = torch.tensor([[1, 3, 3, 3, 3, 4, 4, 4, 4, 2] * 4])
    torch.manual_seed(0)
    module.training_step({"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}, 0)
    assert torch.equal(seen["gold"], ids) and not torch.equal(seen["input"], ids)


def test_attribute_swap_runs_in_a_build_and_checks_its_words(tiny_build, small_corpus, tmp_path):
    """augment.attribute_swap_p runs in a build; bad probabilities and multi-token words are rejected."""
    from hydra import compose, initialize_config_dir

    from recipes.embedded_target.build import CONF_DIR, run_build
    from recipes.embedded_target.recipe import TargetPretraining, attribute_word_groups
    from tests.conftest import TINY_TARGET_OVERRIDES

    source_dir, _ = tiny_build
    tok = AutoTokenizer.from_pretrained(source_dir)
    groups = attribute_word_groups(tok, {"colour": ["red", "blue"], "shape": ["circle", "square"]})
    assert [len(g) for g in groups] == [2, 2]
    with pytest.raises(ValueError, match="'zqxjvk' is .* tokens"):
        attribute_word_groups(tok, {"colour": ["zqxjvk"]})
    config = LlavaForConditionalGeneration.from_pretrained(source_dir).config
    with pytest.raises(ValueError, match="attribute_swap_p=1.0"):
        TargetPretraining(config, attribute_swap_p=1.0, attribute_groups=groups)
    overrides = [
        f"log_dir={tmp_path / 'logs'}",
        f"corpus.dir={small_corpus}",
        "corpus.n_train=120",
        "corpus.n_val=16",
        "corpus.n_test=32",
        "corpus.samples_per_shard=50",
        f"init_from={source_dir}",
        f"out_dir={tmp_path / 'noisy'}",
        "augment.attribute_swap_p=0.5",
    ] + TINY_TARGET_OVERRIDES
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="target_recipe", overrides=overrides)
    report = run_build(cfg)
    assert report["recipe"]["augment"]["attribute_swap_p"] == 0.5 and report["steps"] > 0


def test_corpus_options_feed_a_build(tiny_build, tmp_path):
    """corpus.unnamed_colour_prob / task_weights / max_turns reach the build's own corpus."""
    from hydra import compose, initialize_config_dir

    from recipes.embedded_target.build import CONF_DIR, run_build
    from tests.conftest import TINY_TARGET_OVERRIDES

    corpus = tmp_path / "corpus_unnamed"
    overrides = [
        f"log_dir={tmp_path / 'logs'}",
        f"corpus.dir={corpus}",
        "corpus.n_train=60",
        "corpus.n_val=16",
        "corpus.n_test=16",
        "corpus.samples_per_shard=50",
        "corpus.unnamed_colour_prob=0.3",
        "corpus.task_weights={describe: 1, attribute: 3}",
        "corpus.max_turns=5",
        f"init_from={tiny_build[0]}",
        f"out_dir={tmp_path / 'out'}",
    ] + TINY_TARGET_OVERRIDES
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="target_recipe", overrides=overrides)
    report = run_build(cfg)
    assert report["recipe"]["corpus"]["unnamed_colour_prob"] == 0.3 and report["steps"] > 0
    spec = json.loads((corpus / "manifest.json").read_text())["spec"]
    assert spec["unnamed_colour_prob"] == 0.3 and spec["task_weights"] == {"describe": 1, "attribute": 3}
    assert spec["max_turns"] == 5
    records = [json.loads(s["json"]) for s in wds.WebDataset(str(corpus / "train-000000.tar"), shardshuffle=False)]
    assert any(o["colour"] is None and o["paint"] for r in records for o in r["scene"]["objects"])
    assert {t for r in records for t in r["tasks"]} == {"describe", "attribute"}
