"""LLaVA-NeXT (``llava_next``, "LLaVA-1.6"): AnyRes tiling, images only.

Facts (transformers 5.23 ``LlavaNextModel.get_image_features`` / ``pack_image_features``):

* the image processor picks the best resolution among ``image_grid_pinpoints`` for the *original* image size,
  resizes + pads the image to it and cuts it into ``image_size`` tiles; ``pixel_values`` is ``[N, 1 + tiles, 3, S,
  S]`` (tile 0 = the whole image resized to ``S``), ``image_sizes`` the original ``(height, width)``;
* each tile gives ``(S/p)^2`` patch features (CLS dropped by the ``default`` select strategy);
* one image's tokens, row-major: the base tile's ``g x g`` grid, then the tiles' joint grid (``rows x cols`` patch
  positions) with the padding rows/columns removed ("unpad", from the original aspect ratio) and one
  ``image_newline`` token after every row. The count therefore depends on the original size (not a square);
* position ids are plain 1-D (Llama / Mistral RoPE), so prefill and tree verification are the base class's.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from transformers import LlavaNextForConditionalGeneration

from .family import FamilyAdapter, ImageTooSmallError
from .inputs import EncodedImages, VisualInputs, VisualLayout

__all__ = ["LlavaNextAdapter", "anyres_layout"]


def anyres_layout(
    orig_height: int, orig_width: int, config, *, max_tiles_area: int | None = None, tiled: bool = True
) -> VisualLayout:
    """Token layout of one AnyRes image (see the module doc), computed with the modeling code's own helpers.

    ``max_tiles_area``: LLaVA-OneVision's ``anyres_max_N`` cap (the unpadded grid is shrunk bilinearly when it holds
    more than ``1.1^2 * N`` tiles' worth of patches); ``tiled=False``: OneVision's multi-image mode, where an image is
    only its base tile plus one newline token.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    size = int(config.vision_config.image_size)
    g = size // int(config.vision_config.patch_size)
    if not tiled:
        return VisualLayout([("grid", g, g), ("newline", 1, 1)])
    tiles_h, tiles_w = get_anyres_image_grid_shape((orig_height, orig_width), config.image_grid_pinpoints, size)
    # unpad_image only slices, so an empty [0, rows, cols] tensor gives the unpadded grid's shape for free.
    _, rows, cols = unpad_image(torch.empty(0, tiles_h * g, tiles_w * g), (orig_height, orig_width)).shape
    if max_tiles_area is not None:
        ratio = math.sqrt(rows * cols / (max_tiles_area * g**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return VisualLayout([("grid", g, g), ("tiles", int(rows), int(cols))])


class LlavaNextAdapter(FamilyAdapter):
    """``LlavaNextForConditionalGeneration`` (CLIP tower, AnyRes, Llama / Mistral / Vicuna decoder)."""

    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    model_class = LlavaNextForConditionalGeneration
    default_image_token: ClassVar[str] = "<image>"

    @classmethod
    def _layout_kwargs(cls, config, visual: VisualInputs | None, index: int) -> dict:
        return {}

    @classmethod
    def image_layouts(cls, config, visual: VisualInputs) -> list[VisualLayout]:
        return [
            anyres_layout(int(h), int(w), config, **cls._layout_kwargs(config, visual, i))
            for i, (h, w) in enumerate(visual.image_sizes.tolist())
        ]

    @classmethod
    def check_image_size(cls, height: int, width: int, config, image_processor) -> None:
        patch = int(config.vision_config.patch_size)
        layout = anyres_layout(height, width, config, **cls._layout_kwargs(config, None, 0))
        _, rows, cols = layout.segments[-1]
        if min(height, width) < patch or rows < 1 or cols < 1:
            raise ImageTooSmallError(
                f"Image {width}x{height} (width x height) is too small or too elongated for {config.model_type}: "
                f"each side must be at least one {patch}-pixel patch and the image must fill at least one patch "
                f"row and column of its AnyRes grid. Use a larger image."
            )

    def _layout_for_size(self, height: int, width: int) -> VisualLayout:
        return anyres_layout(height, width, self.config, **self._layout_kwargs(self.config, None, 0))

    def _image_feature_kwargs(self, visual: VisualInputs) -> dict:
        return {}

    def _encode_image_inputs(self, visual: VisualInputs) -> EncodedImages:
        cfg = self.config
        if visual.image_sizes is None:
            raise ValueError(f"{cfg.model_type} needs image_sizes from its image processor (VisualInputs.image_sizes).")
        out = self.model.model.get_image_features(
            pixel_values=visual.pixel_values.to(self.dtype),
            image_sizes=visual.image_sizes,
            # This model's config values, not whatever defaults a transformers version would fill in.
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
            **self._image_feature_kwargs(visual),
        )
        return EncodedImages(list(out.pooler_output))
