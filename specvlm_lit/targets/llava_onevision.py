"""LLaVA-OneVision (``llava_onevision``): AnyRes with a tile cap, SigLIP tower, Qwen2 decoder (ChatML prompts).

Differences from LLaVA-NeXT (transformers 5.23 ``LlavaOnevisionModel``):

* SigLIP has no CLS token, so the ``full`` select strategy keeps all ``(S/p)^2`` patches of a tile;
* ``vision_aspect_ratio="anyres_max_N"``: an unpadded tile grid larger than ``1.1^2 * N`` tiles is shrunk
  bilinearly to about ``N`` tiles' worth of patches (the count uses the same ``int(rows // ratio)`` rule);
* a prompt with more than one image (``batch_num_images > 1``) does not tile: each image is its base tile plus one
  ``image_newline`` token;
* video (``pixel_values_videos [V, frames, 3, S, S]``, every frame one base tile): each frame's ``g x g`` patch grid
  is pooled bilinearly to ``ceil(g / 2) x ceil(g / 2)``, the frames follow each other, and ONE ``image_newline``
  token ends the video: ``frames * ceil(g / 2)^2 + 1`` ``<video>`` tokens (``get_video_features``, and the HF
  processor's ``replace_video_token``).

Position ids are plain 1-D (Qwen2 RoPE), so prefill and tree verification are the base class's.
"""

from __future__ import annotations

import math
from typing import ClassVar

from transformers import LlavaOnevisionForConditionalGeneration

from .inputs import EncodedImages, VisualInputs, VisualLayout
from .llava_next import LlavaNextAdapter

__all__ = ["LlavaOnevisionAdapter"]


def _max_tiles(config) -> int:
    ratio = str(config.vision_aspect_ratio)
    if not ratio.startswith("anyres_max_"):
        raise ValueError(f"Unsupported vision_aspect_ratio {ratio!r} (expected 'anyres_max_<N>').")
    return int(ratio[len("anyres_max_") :])


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    model_class = LlavaOnevisionForConditionalGeneration
    supports_video: ClassVar[bool] = True
    default_video_token: ClassVar[str] = "<video>"

    @classmethod
    def video_layouts(cls, config, visual: VisualInputs) -> list[list[VisualLayout]]:
        pooled = math.ceil(int(config.vision_config.image_size) // int(config.vision_config.patch_size) / 2)
        frames = [int(video.shape[0]) for video in visual.pixel_values_videos]
        return [[VisualLayout([("merged", pooled, pooled), ("newline", 1, 1)], frames=n)] for n in frames]

    def _encode_video_inputs(self, visual: VisualInputs) -> EncodedImages:
        cfg = self.config
        out = self.model.model.get_video_features(
            pixel_values_videos=visual.pixel_values_videos.to(self.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        return EncodedImages(list(out.pooler_output))  # [V, frames * pooled^2 + 1, H]: one tensor per video

    @classmethod
    def _layout_kwargs(cls, config, visual: VisualInputs | None, index: int) -> dict:
        tiled = True
        if visual is not None and visual.batch_num_images is not None:
            # The sample holding image `index` decides: several images per sample are not tiled.
            start = 0
            for n in visual.batch_num_images.tolist():
                if index < start + n:
                    tiled = n == 1
                    break
                start += n
        return {"max_tiles_area": _max_tiles(config), "tiled": tiled}

    def _image_feature_kwargs(self, visual: VisualInputs) -> dict:
        return {"vision_aspect_ratio": self.config.vision_aspect_ratio, "batch_num_images": visual.batch_num_images}
