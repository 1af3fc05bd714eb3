"""Mistral 3 (``mistral3``: Mistral-Small-3.1 / 3.2): Pixtral vision tower, 2x2 patch merger, Mistral decoder; images
only (a video gets the image-only error of :meth:`FamilyProcessor.check_video`).

Facts (transformers 5.23 ``Mistral3Model``, ``PixtralProcessor``, ``PixtralImageProcessorPil``):

* the image processor shrinks an image (aspect ratio kept, sides floored) until it fits in ``size["longest_edge"]``
  (never enlarges it), then rounds each side *up* to a multiple of ``patch_size * spatial_merge_size``: the HF
  processor passes that product as the image processor's ``patch_size`` (the checkpoint's ``preprocessor_config.json``
  holds the tower's own patch, 14), and so does :meth:`Mistral3Adapter.image_processor_kwargs`. ``pixel_values`` is
  ``[N, 3, H, W]`` zero-padded to the largest image of the batch, ``image_sizes [N, 2]`` each image's (height, width)
  *as resized* (not the original size);
* Pixtral encodes every image at its own size (2-D RoPE over its patch grid, attention within each image only); the
  projector's patch merger turns every 2x2 block of patches into one feature: an image gives ``rows x cols``
  features, ``rows = H // (p * m)``, ``cols = W // (p * m)``, row-major;
* prompt: the chat template writes one ``[IMG]`` per image (BOS, a dated default ``[SYSTEM_PROMPT]``,
  ``[INST]...[/INST]``, assistant turns ``text</s>``, no generation prompt); the processor expands it into ``rows``
  lines of ``cols`` ``[IMG]`` tokens, each line ended by ``[IMG_BREAK]``, the last one by ``[IMG_END]`` instead:
  ``rows * (cols + 1)`` tokens. Only the ``[IMG]`` positions get visual features (HF's placeholder mask is
  ``input_ids == image_token_id``); ``[IMG_BREAK]`` / ``[IMG_END]`` are ordinary tokens with their text embeddings.
  The model config names only ``[IMG]`` (``image_token_index``): the break / end ids are the tokenizer's;
* positions are plain 1-D (Mistral RoPE over sequence positions; the 2-D RoPE is inside the vision tower), so
  prefill, tree verification and KV compaction are the base class's.

How this project sees an image. The break / end tokens belong to the image's run of visual tokens
(``visual_token_ids`` = ``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``), so the run is contiguous as in every family, and
its layout is ``("tiles", rows, cols)``: the ``rows x cols`` ``[IMG]`` grid (``pieces()``, what grid compressors
pool) with one extra token after each row (``extra_indices()``: the breaks and the end), the shape of LLaVA-NeXT's
unpadded tiles with their ``image_newline`` tokens. ``encode_images`` gives ``rows * (cols + 1)`` rows per image: the
merger's features with the ``[IMG_BREAK]`` / ``[IMG_END]`` token embeddings in their places, so the scatter into the
whole run writes exactly HF's input embeddings. Knowing the break / end ids needs the tokenizer, so an adapter built
from an in-memory model needs ``attach_processor`` before its first visual forward.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from transformers import Mistral3ForConditionalGeneration

from .family import FamilyAdapter, ImageTooSmallError
from .inputs import EncodedImages, VisualInputs, VisualLayout

__all__ = ["Mistral3Adapter"]


def _token_px(config) -> int:
    """Pixels per side of one visual token: the tower's patch times the merger's ``spatial_merge_size``."""
    return int(config.vision_config.patch_size) * int(config.spatial_merge_size)


def _grid_layout(height: int, width: int, config) -> VisualLayout:
    """Layout of an image resized to ``height x width`` (HF's ``replace_image_token``: floor division)."""
    px = _token_px(config)
    return VisualLayout([("tiles", height // px, width // px)])


class Mistral3Adapter(FamilyAdapter):
    """``Mistral3ForConditionalGeneration`` (Pixtral tower + patch merger, Mistral decoder)."""

    model_types: ClassVar[tuple[str, ...]] = ("mistral3",)
    model_class = Mistral3ForConditionalGeneration
    default_image_token: ClassVar[str] = "[IMG]"
    #: The row-break / image-end tokens (``PixtralProcessor`` defaults; real checkpoints use these names).
    image_break_token: ClassVar[str] = "[IMG_BREAK]"
    image_end_token: ClassVar[str] = "[IMG_END]"

    # ------------------------------------------------------------------------------------------ layout facts
    @classmethod
    def run_token_ids(cls, config, tokenizer) -> tuple[int, ...]:
        """``([IMG], [IMG_BREAK], [IMG_END])`` ids: every token of an image's run."""
        from ..target import TargetLoadError

        ids = []
        for token in (cls.image_break_token, cls.image_end_token):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == getattr(tokenizer, "unk_token_id", -1):
                raise TargetLoadError(
                    f"The tokenizer has no {token!r} token, which {config.model_type} image prompts need. Use the "
                    f"tokenizer saved with this target checkpoint."
                )
            ids.append(int(token_id))
        return (cls.config_image_token_id(config), *ids)

    @classmethod
    def image_layouts(cls, config, visual: VisualInputs) -> list[VisualLayout]:
        if visual.image_sizes is None:
            raise ValueError(
                f"{config.model_type} needs image_sizes from its image processor (VisualInputs.image_sizes)."
            )
        return [_grid_layout(int(h), int(w), config) for h, w in visual.image_sizes.tolist()]

    @classmethod
    def image_token_ids(cls, config, tokenizer, layout: VisualLayout) -> list[int]:
        image, row_break, end = cls.run_token_ids(config, tokenizer)
        _, rows, cols = layout.segments[0]
        ids = ([image] * cols + [row_break]) * rows
        ids[-1] = end
        return ids

    @classmethod
    def image_processor_kwargs(cls, config, image_processor) -> dict:
        return {"patch_size": _token_px(config)}

    @classmethod
    def resized_size(cls, height: int, width: int, config, image_processor) -> tuple[int, int]:
        """``(height, width)`` the image processor resizes a ``height x width`` image to (its own rule, applied
        to a zero-stride stand-in of the image, so no pixels are allocated)."""
        from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size

        if not getattr(image_processor, "do_resize", True):
            return height, width
        size = image_processor.size
        longest = size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)
        bound = (longest, longest) if longest else (size["height"], size["width"])
        px = _token_px(config)
        stand_in = np.broadcast_to(np.zeros((), dtype=np.uint8), (height, width, 3))
        h, w = get_resize_output_image_size(stand_in, bound, (px, px), input_data_format="channels_last")
        return int(h), int(w)

    @classmethod
    def check_image_size(cls, height: int, width: int, config, image_processor) -> None:
        cls._checked_layout(height, width, config, image_processor)

    @classmethod
    def _checked_layout(cls, height: int, width: int, config, image_processor) -> VisualLayout:
        """The layout of a ``height x width`` image as the processor resizes it; too small / elongated -> error."""
        layout = _grid_layout(*cls.resized_size(height, width, config, image_processor), config)
        _, rows, cols = layout.segments[0]
        if rows < 1 or cols < 1:
            raise ImageTooSmallError(
                f"Image {width}x{height} (width x height) is too small or too elongated for {config.model_type}'s "
                f"processor: shrunk to fit its longest edge, one side would be under one pixel, so the image "
                f"would have no row or column of {_token_px(config)}-pixel visual tokens. Use a less elongated image."
            )
        return layout

    def _layout_for_size(self, height: int, width: int) -> VisualLayout:
        return self._checked_layout(height, width, self.config, self.processor.image_processor)

    # ------------------------------------------------------------------------------------------------ images
    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``: the whole run of an image (see the module doc)."""
        ids = getattr(self, "_run_ids", None)
        if ids is None:
            ids = self._run_ids = self.run_token_ids(self.config, self.processor.tokenizer)
        return ids

    def attach_processor(self, processor) -> None:
        super().attach_processor(processor)
        self._run_ids = None

    def _encode_image_inputs(self, visual: VisualInputs) -> EncodedImages:
        cfg = self.config
        layouts = self.image_layouts(cfg, visual)
        out = self.model.model.get_image_features(
            pixel_values=visual.pixel_values.to(self.dtype),
            image_sizes=visual.image_sizes,
            vision_feature_layer=cfg.vision_feature_layer,  # this model's value, not a version's default
            return_dict=True,
        )
        _, row_break, end = self.visual_token_ids
        text = self.embed_tokens(torch.tensor([row_break, end], device=self.device))
        feats = []
        for grid, layout in zip(out.pooler_output, layouts):
            _, rows, cols = layout.segments[0]
            tail = text[0].expand(rows, 1, -1).clone()
            tail[-1, 0] = text[1]
            rows_out = torch.cat([grid.reshape(rows, cols, -1), tail.to(grid.dtype)], 1)
            feats.append(rows_out.reshape(rows * (cols + 1), -1))
        return EncodedImages(feats)
