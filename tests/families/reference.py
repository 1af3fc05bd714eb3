"""Independent references for the family tests: Hugging Face's own processor classes and test images.

The HF Qwen-VL / OneVision processors refuse to be constructed without a video processor (which needs
torchvision); for *images* they never touch it, so the reference is built with that one class check relaxed for a
``None`` video processor. Everything else (placeholder expansion, ``mm_token_type_ids``, ``image_sizes``, ...) is
HF's own code, which is what the adapters' outputs are compared with.
"""

from __future__ import annotations

import contextlib
import json
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
}

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


def hf_processor(family: str, path: Path, tokenizer, image_processor):
    """HF's processor class of ``family`` over the checkpoint's tokenizer + image processor (images only)."""
    kwargs = {}
    config_file = Path(path) / "processor_config.json"
    if config_file.is_file():
        kwargs = json.loads(config_file.read_text())
        kwargs.pop("processor_class", None)
    cls = getattr(transformers, _PROCESSOR_CLASSES[family])
    if family != "llava_next":
        kwargs["video_processor"] = None
    with _video_processor_optional():
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
