"""Reliability probes of decoding (issue 19): no unbounded decode, one-line errors for edited model configs.

* An ordinary 4000x3000 photo on a target whose processor does not resize is downscaled to the vision tower's
  native size (it used to become 187,500 visual tokens and decode for minutes); the statistics say so.
* Prompt + visual tokens + ``max_new_tokens`` beyond the target's context stop with one line giving the three
  numbers (a 3,700-token prompt used to degenerate silently, ``max_new_tokens=100000`` ran unbounded).
* An edited target or drafter ``config.json`` (wrong size, deleted key, wrong type) stops with one line naming the
  file and the field, before transformers prints its load report.

Every probe fails fast on the code before the fix: forward hooks forbid model work where the fix must stop first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from specvlm_lit.decoding.pipeline import DecodeInputError, SpecVLMPipeline, format_stats
from specvlm_lit.drafter.eagle import DrafterLoadError, EagleVLMDrafter, save_atomically
from specvlm_lit.target import TargetAdapter, TargetLoadError, image_input_size

REPO = Path(__file__).resolve().parents[2]
TREE = {"top_k": 2, "depth": 2, "total_tokens": 4}


@pytest.fixture(scope="module")
def parts(tiny_target, tmp_path_factory):
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("reliability_decoding")
    adapter = TargetAdapter.from_pretrained(tiny_target)
    torch.manual_seed(0)
    drafter_dir = save_atomically(EagleVLMDrafter.for_target(adapter), root / "drafter")
    processor = AutoProcessor.from_pretrained(tiny_target)
    pipe = SpecVLMPipeline.from_components(adapter, processor, EagleVLMDrafter.load(drafter_dir), tree=TREE)
    image = root / "small.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    return {"root": root, "pipe": pipe, "drafter": drafter_dir, "target": tiny_target, "image": image}


class forbid_model_work:
    """Fail the test at the first forward of any module of the pipeline (the check must come first)."""

    def __init__(self, pipe):
        self.modules = list(pipe.adapter.model.modules()) + list(pipe.drafter.modules())

    def __enter__(self):
        def forbid(*_):
            raise AssertionError("model work started before the request was checked")

        self.handles = [m.register_forward_pre_hook(forbid) for m in self.modules]

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def decode_cli(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "decode.py", "threads=1", *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(out, *needles):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "LOAD REPORT" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), out.stderr[-3000:]
    assert sum(line.startswith("error:") for line in out.stderr.splitlines()) == 1


# -------------------------------------------------------------------------------------------------- image size
def test_a_large_photo_is_downscaled_to_the_towers_native_size(parts):
    pipe = parts["pipe"]
    vision = pipe.adapter.config.vision_config
    assert not pipe.processor.image_processor.do_resize and vision.image_size == 128 and vision.patch_size == 8
    photo = Image.new("RGB", (4000, 3000), (90, 140, 60))
    inputs = pipe.prepare(photo, "What is in the image?", max_new_tokens=4)
    assert inputs.image_size == (128, 96) and inputs.original_size == (4000, 3000) and inputs.downscaled
    assert inputs.n_visual == (128 // 8) * (96 // 8)  # not 187,500
    result = pipe.generate(photo, "What is in the image?", max_new_tokens=4)
    assert result.stats.target_visual_tokens == inputs.n_visual
    assert "image: 128x96 px, downscaled from 4000x3000" in format_stats(result, pipe.tree)
    assert result.as_dict()["image"] == {"original_size": [4000, 3000], "encoded_size": [128, 96], "downscaled": True}


def test_images_within_the_native_size_are_never_resized(parts):
    pipe = parts["pipe"]
    for size in ((64, 64), (128, 128), (40, 120), (16, 16)):
        inputs = pipe.prepare(Image.new("RGB", size, (1, 2, 3)), "What is it?")
        assert inputs.image_size == size and not inputs.downscaled
    plain = pipe.generate(parts["image"], "What is it?", max_new_tokens=3)
    assert "image: 64x64 px, as given" in format_stats(plain, pipe.tree)


def test_resize_rule_leaves_resizing_processors_alone_and_keeps_a_patch_row():
    from transformers import CLIPImageProcessor
    from transformers.models.clip import CLIPVisionConfig

    vision = CLIPVisionConfig(image_size=336, patch_size=14)
    assert image_input_size(CLIPImageProcessor(do_resize=True), vision, 4000, 3000) == (4000, 3000)
    keeps = CLIPImageProcessor(do_resize=False)
    assert image_input_size(keeps, vision, 4000, 3000) == (336, 252)
    assert image_input_size(keeps, vision, 3000, 4000) == (252, 336)
    assert image_input_size(keeps, vision, 300, 200) == (300, 200)  # never upscaled
    assert image_input_size(keeps, vision, 10000, 100) == (336, 14)  # still one row of patches


# ------------------------------------------------------------------------------------------------ context
def test_requests_beyond_the_context_stop_before_model_work(parts):
    pipe = parts["pipe"]
    context = pipe.adapter.context_length
    assert context == 2048
    long_prompt = "what colour is the shape " * 740  # ~3,700 words
    with forbid_model_work(pipe):
        for fn in (pipe.generate, pipe.generate_ar):
            with pytest.raises(DecodeInputError, match=r"prompt tokens \+ 64 visual tokens \+ 8 max_new_tokens"):
                fn(parts["image"], long_prompt, max_new_tokens=8)
            with pytest.raises(DecodeInputError, match=r"\+ 100000 max_new_tokens = \d+ positions.*is 2048"):
                fn(parts["image"], "What is it?", max_new_tokens=100000)
        inputs = pipe.prepare(parts["image"], "What is it?")
        with pytest.raises(DecodeInputError, match="lower max_new_tokens"):
            pipe.decode(inputs, max_new_tokens=context, warp=_greedy())
        with pytest.raises(DecodeInputError, match="lower max_new_tokens"):
            pipe.hf_generate(inputs, max_new_tokens=context, warp=_greedy())
    fits = context - inputs.prompt_len
    pipe.check_fits(inputs, fits)  # exactly full is allowed


def _greedy():
    from specvlm_lit.decoding.configs import WarpConfig

    return WarpConfig()


def test_cli_long_prompt_is_a_one_line_error(parts, tmp_path):
    out = decode_cli(
        f"target={parts['target']}",
        f"drafter={parts['drafter']}",
        f"image={parts['image']}",
        "prompt=" + "what colour is the shape " * 740,
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert_one_line_error(out, "visual tokens + 128 max_new_tokens", "2048", "shorter prompt")


# ------------------------------------------------------------------------------------ edited model configs
def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _set(section, key, value):
    def edit(config):
        (config[section] if section else config)[key] = value

    return edit


def _delete(section, key):
    return lambda config: (config[section] if section else config).pop(key)


TARGET_EDITS = [
    ("hidden_size", _set("text_config", "hidden_size", 48), "text_config.hidden_size is 48 but the weights say 32"),
    ("vocab_size", _set("text_config", "vocab_size", 9999), "text_config.vocab_size is 9999 but the weights say"),
    ("deleted key", _delete("text_config", "num_hidden_layers"), "text_config.num_hidden_layers is missing"),
    ("wrong type", _set("vision_config", "patch_size", "8"), "vision_config.patch_size must be an integer"),
    ("image_size", _set("vision_config", "image_size", 224), "vision_config.image_size=224"),
]


@pytest.mark.parametrize("name,edit,message", TARGET_EDITS, ids=[c[0] for c in TARGET_EDITS])
def test_edited_target_config_names_the_field(parts, tmp_path, capfd, name, edit, message):
    bad = _edited_copy(parts["target"], tmp_path / "target", edit)
    with pytest.raises(TargetLoadError) as err:
        TargetAdapter.from_pretrained(bad)
    assert message in str(err.value) and str(bad / "config.json") in str(err.value)
    assert "LOAD REPORT" not in capfd.readouterr().err


DRAFTER_EDITS = [
    ("hidden_size", _set(None, "hidden_size", 48), "hidden_size is 48 but the weights say 32"),
    ("deleted key", _delete(None, "intermediate_size"), "intermediate_size is missing, so the default 11008"),
    ("wrong type", _set(None, "num_attention_heads", "2"), "num_attention_heads must be an integer"),
    ("vocab_size", _set(None, "vocab_size", 9999), "vocab_size is 9999"),
    ("final_norm", _set(None, "final_norm", False), "final_norm was edited"),
]


@pytest.mark.parametrize("name,edit,message", DRAFTER_EDITS, ids=[c[0] for c in DRAFTER_EDITS])
def test_edited_drafter_config_names_the_field(parts, tmp_path, capfd, name, edit, message):
    bad = _edited_copy(parts["drafter"], tmp_path / "drafter", edit)
    with pytest.raises(DrafterLoadError) as err:
        EagleVLMDrafter.load(bad, target=parts["pipe"].adapter)
    assert message in str(err.value) and str(bad) in str(err.value)
    assert "LOAD REPORT" not in capfd.readouterr().err


def test_cli_edited_drafter_config_is_a_one_line_error(parts, tmp_path):
    bad = _edited_copy(parts["drafter"], tmp_path / "drafter", _set(None, "hidden_size", 48))
    out = decode_cli(
        f"target={parts['target']}",
        f"drafter={bad}",
        f"image={parts['image']}",
        "prompt=What is it?",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert_one_line_error(out, str(bad / "config.json"), "hidden_size is 48 but the weights say 32", "Fix:")
