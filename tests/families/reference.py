"""Independent references for the family tests: Hugging Face's own processor classes and test images.

The HF Qwen-VL / OneVision processors refuse to be constructed without a video processor (which needs
torchvision); for *images* they never touch it, so the reference is built with that one class check relaxed for a
``None`` video processor. ``PixtralProcessor`` (Mistral 3) cannot even be imported without torchvision: its module
imports the torchvision image processor for one helper (``get_resize_output_image_size``, used only to count tokens
without processing), so the PIL module's helper of the same name stands in for that import. Everything else
(placeholder expansion, ``mm_token_type_ids``, ``image_sizes``, ...) is HF's own code, which is what the adapters'
outputs are compared with.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import transformers
from PIL import Image

_PROCESSOR_CLASSES = {
    "llava_next": "LlavaNextProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "mistral3": "PixtralProcessor",
}
# The processors that take a video processor (the others have no such argument).
_WITH_VIDEO = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Width x height of the test images: different sizes and aspect ratios (wide, tall, square, panorama).
IMAGE_SIZES = ((50, 40), (40, 90), (64, 64), (120, 36))


def image(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image (random pixels make the answers depend on the image)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@contextlib.contextmanager
def _video_processor_optional():
    orig = transformers.ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        return None if (arg is None and name == "video_processor") else orig(self, name, arg)

    transformers.ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        transformers.ProcessorMixin.check_argument_for_proper_class = orig


def _processor_class(name: str):
    """HF's processor class ``name``; ``PixtralProcessor`` imported with its one torchvision-only import stood in for
    by the PIL module's identical helper when torchvision is missing."""
    if name != "PixtralProcessor":
        return getattr(transformers, name)
    module = "transformers.models.pixtral.processing_pixtral"
    try:
        return importlib.import_module(module).PixtralProcessor
    except ImportError:
        pass
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    fast = "transformers.models.pixtral.image_processing_pixtral"
    stand_in = types.ModuleType(fast)
    stand_in.get_resize_output_image_size = pil.get_resize_output_image_size
    saved = sys.modules.get(fast)
    sys.modules[fast] = stand_in
    try:
        return importlib.import_module(module).PixtralProcessor
    finally:
        if saved is None:
            sys.modules.pop(fast, None)
        else:
            sys.modules[fast] = saved


def hf_processor(family: str, path: Path, tokenizer, image_processor):
    """HF's processor class of ``family`` over the checkpoint's tokenizer + image processor (images only)."""
    kwargs = {}
    config_file = Path(path) / "processor_config.json"
    if config_file.is_file():
        kwargs = json.loads(config_file.read_text())
        kwargs.pop("processor_class", None)
    cls = _processor_class(_PROCESSOR_CLASSES[family])
    if family in _WITH_VIDEO:
        kwargs["video_processor"] = None
    with _video_processor_optional():
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def text_kwargs(tokenizer, text: str) -> dict:
    """What HF's ``processor.apply_chat_template(tokenize=True)`` passes when it tokenizes a rendered chat: no
    special tokens added when the template already wrote the BOS token (Mistral 3), else the tokenizer's defaults."""
    bos = tokenizer.bos_token
    return {"add_special_tokens": False} if bos is not None and text.startswith(bos) else {}
