"""What every non-LLaVA-1.5 family adapter shares: processor outputs in, the checkpoint's own prompt format.

:class:`FamilyAdapter` extends :class:`~specvlm_lit.target.TargetAdapter` (which stays the LLaVA-1.5 base) with

* prompt building from the checkpoint's own files (:attr:`processor`, :meth:`render_prompt`,
  :meth:`render_conversation`, see :mod:`.processor`);
* images as the family's processor outputs (:class:`~.inputs.VisualInputs`) instead of raw ``[3, h, w]`` pixels
  (AnyRes tiles and Qwen's flattened patches are not images), encoded into :class:`~.inputs.EncodedImages`;
* the visual-token layout per image (:meth:`image_layouts`), which every count derives from;
* text-decoder shape facts that hold for all families' weight names.

Subclasses (one module per family) set ``model_types`` / ``model_class`` and implement ``_encode_image_inputs`` and
``image_layouts`` (video families also ``_encode_video_inputs`` and ``video_layouts``); they register by
``model_type`` through ``TargetAdapter.__init_subclass__``. Images and videos of one prompt are kept in the order
their tokens appear (``VisualInputs.kinds``): features, layouts and the placeholder scatter all follow it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from ..config_weights import ShapeFact, attention_shape_facts
from ..target import TargetAdapter
from .inputs import EncodedImages, PromptInputs, VisualInputs, VisualLayout
from .processor import FamilyProcessor, PromptError

__all__ = ["FamilyAdapter", "ImageTooSmallError"]


class ImageTooSmallError(PromptError):
    """An image is too small (or too elongated) for the family's image processor."""


# Decoder layers under every family's saved names (``model.layers``, ``language_model.model.layers``,
# ``model.language_model.layers``), but not vision towers' ``encoder.layers`` / ``blocks``.
_TEXT = r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\."


def _head_dim(value) -> int:
    """``text_config.head_dim`` where the config class has one (Llama, Qwen3), else hidden / heads (Qwen2)."""
    try:
        head_dim = value("text_config.head_dim")
    except AttributeError:
        head_dim = None
    return int(head_dim or value("text_config.hidden_size") // value("text_config.num_attention_heads"))


_TEXT_SHAPE_FACTS = (
    ShapeFact(("text_config.vocab_size",), r"embed_tokens\.weight$", 0),
    ShapeFact(("text_config.hidden_size",), r"embed_tokens\.weight$", 1),
    ShapeFact(("text_config.num_hidden_layers",), _TEXT + r"(\d+)\.", None),
    ShapeFact(("text_config.intermediate_size",), _TEXT + r"0\.mlp\.gate_proj\.weight$", 0),
    *attention_shape_facts(_TEXT + r"0\.", _head_dim, "text_config."),
)


class FamilyAdapter(TargetAdapter):
    """Base of the LLaVA-NeXT / OneVision / Qwen-VL adapters (no ``model_types`` of its own, so not registered)."""

    #: Whether the family's checkpoints take video at all (video-to-image-only family -> clear error).
    supports_video: ClassVar[bool] = False

    # ------------------------------------------------------------------------------------ family facts (class)
    @classmethod
    def shape_facts(cls) -> tuple[ShapeFact, ...]:
        return _TEXT_SHAPE_FACTS

    @classmethod
    def image_token_string(cls, tokenizer) -> str:
        """The placeholder token the family's processor expands (the tokenizer's ``image_token`` if it has one)."""
        return getattr(tokenizer, "image_token", None) or cls.default_image_token

    @staticmethod
    def config_image_token_id(config) -> int:
        token_id = getattr(config, "image_token_id", None)
        return int(token_id if token_id is not None else config.image_token_index)

    @classmethod
    def video_token_string(cls, tokenizer) -> str:
        """The video placeholder token the family's processor expands (the tokenizer's ``video_token`` if any)."""
        return getattr(tokenizer, "video_token", None) or cls.default_video_token

    #: The video placeholder when the tokenizer names none (set by the video families).
    default_video_token: ClassVar[str | None] = None

    @classmethod
    def config_video_token_id(cls, config) -> int | None:
        """The model's video token id (``None`` for image-only families)."""
        if not cls.supports_video:
            return None
        token_id = getattr(config, "video_token_id", None)
        return int(token_id if token_id is not None else config.video_token_index)

    @classmethod
    def check_image_size(cls, height: int, width: int, config, image_processor) -> None:
        """Raise :class:`ImageTooSmallError` when the family's processor cannot make visual tokens of the image."""
        raise NotImplementedError

    @classmethod
    def image_layouts(cls, config, visual: VisualInputs) -> list[VisualLayout]:
        """The visual-token layout of every image in ``visual`` (processor outputs), in order."""
        raise NotImplementedError

    @classmethod
    def video_layouts(cls, config, visual: VisualInputs) -> list[list[VisualLayout]]:
        """For every video in ``visual``, the layout of each of its runs of video tokens (one run per video, except
        Qwen3-VL: one per temporal patch, separated by timestamp text)."""
        raise NotImplementedError

    @classmethod
    def image_token_ids(cls, config, tokenizer, layout: VisualLayout) -> list[int]:
        """The tokens an image of ``layout`` expands its placeholder into (the HF processor's
        ``replace_image_token``): by default as many image tokens as the layout holds (Mistral 3: rows of image
        tokens separated by row-break tokens)."""
        return [cls.config_image_token_id(config)] * layout.num_tokens

    @classmethod
    def run_token_ids(cls, config, tokenizer) -> tuple[int, ...]:
        """Every token id inside a run of visual tokens in a rendered prompt: the image token, and the video token of
        the video families (Mistral 3 adds its row-break / image-end tokens). A run is what the layouts describe.
        ``tokenizer`` may be ``None`` for the families whose run ids are all in the config (every one but Mistral 3)."""
        video = cls.config_video_token_id(config)
        image = cls.config_image_token_id(config)
        return (image,) if video is None else (image, video)

    @classmethod
    def image_processor_kwargs(cls, config, image_processor) -> dict:
        """Keyword arguments the family's HF processor adds when it calls its image processor (default none;
        Mistral 3: the merged patch size the images are resized to multiples of)."""
        return {}

    @classmethod
    def video_token_ids(cls, config, tokenizer, visual: VisualInputs, index: int) -> list[int]:
        """The tokens video ``index`` of ``visual`` expands its placeholder into (the HF processor's
        ``replace_video_token``): by default its video tokens, all runs back to back."""
        n = sum(layout.num_tokens for layout in cls.video_layouts(config, visual)[index])
        return [cls.config_video_token_id(config)] * n

    @classmethod
    def video_metadata_fields(cls, metadata, video_processor) -> dict:
        """:class:`VisualInputs` fields the family's HF *processor* (not its video processor) derives from a raw
        video's ``VideoMetadata`` (Qwen2.5-VL: ``second_per_grid_ts``; Qwen3-VL: ``video_timestamps``)."""
        return {}

    @classmethod
    def visual_layouts(cls, config, visual: VisualInputs) -> list[VisualLayout]:
        """One layout per run of visual tokens (each image; each video's runs), in prompt order."""
        images = iter(cls.image_layouts(config, visual) if visual.count("image") else [])
        videos = iter(cls.video_layouts(config, visual) if visual.count("video") else [])
        out: list[VisualLayout] = []
        for kind in visual.kinds:
            out += [next(images)] if kind == "image" else next(videos)
        return out

    # ------------------------------------------------------------------------------------------------ prompts
    @property
    def processor(self) -> FamilyProcessor:
        """The checkpoint's own tokenizer + chat template + image processor (loaded on first use from the
        directory the model was loaded from; :meth:`attach_processor` sets another one)."""
        proc = getattr(self, "_processor", None)
        if proc is None:
            from ..target import TargetLoadError

            path = getattr(self.model, "name_or_path", "") or ""
            if not path:
                raise TargetLoadError(
                    f"{type(self).__name__} was built from an in-memory model, so its processor files are unknown: "
                    f"call attach_processor(FamilyProcessor.load(<checkpoint dir>))."
                )
            proc = self._processor = FamilyProcessor.load(path, type(self))
        return proc

    def attach_processor(self, processor) -> None:
        """Use ``processor`` for prompts: a :class:`FamilyProcessor`, or an HF processor of this checkpoint (its
        tokenizer, image processor and chat template are taken)."""
        if not isinstance(processor, FamilyProcessor):
            tok = getattr(processor, "tokenizer", None)
            template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
            processor = FamilyProcessor(type(self), self.config, tok, processor.image_processor, template)
        self._processor = processor

    def render_prompt(
        self, messages: Sequence[dict], images: Sequence | None = None, videos: Sequence | None = None
    ) -> PromptInputs:
        """Decoding prompt in the checkpoint's chat format: ``input_ids [1, T]`` + the processor outputs
        (``.visual``, for :meth:`encode_images` / ``forward(pixel_values=...)``). ``videos``: see
        :meth:`FamilyProcessor.render`."""
        return self.processor.render(messages, images, add_generation_prompt=True, videos=videos)

    def render_conversation(
        self, messages: Sequence[dict], images: Sequence | None = None, max_length=None, videos=None
    ):
        """Training conversation (multi-turn): ids, processor outputs and the assistant-only ``loss_mask``."""
        return self.processor.render_conversation(messages, images, max_length=max_length, videos=videos)

    def hf_generate_inputs(self, input_ids: torch.Tensor, visual: VisualInputs | None) -> dict:
        """The image keyword arguments of HF ``generate()`` for a prompt: the processor outputs, as HF takes them."""
        return {} if visual is None else visual.to(self.device, self.dtype).hf_kwargs()

    # ------------------------------------------------------------------------------------------------- images
    @property
    def video_token_id(self) -> int | None:
        return self.config_video_token_id(self.config)

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Every id of a visual run, the positions visual features are scattered into (:meth:`run_token_ids`)."""
        return self.run_token_ids(self.config, None)

    def _encode_image_inputs(self, visual: VisualInputs) -> EncodedImages:
        raise NotImplementedError

    def _encode_video_inputs(self, visual: VisualInputs) -> EncodedImages:
        raise NotImplementedError(f"{self.config.model_type} targets take images only")

    def _encode_visual(self, visual: VisualInputs) -> EncodedImages:
        """Images and videos encoded separately (one tower call each), merged into prompt order."""
        empty = EncodedImages([])
        images = self._encode_image_inputs(visual) if visual.count("image") else empty
        videos = self._encode_video_inputs(visual) if visual.count("video") else empty
        return EncodedImages.interleave(images, videos, visual)

    @torch.no_grad()
    def encode_images(self, pixel_values) -> EncodedImages:
        """Encode a prompt's images and videos, given as the family's processor outputs (:class:`VisualInputs`),
        into one ``[n_i, H]`` feature tensor per image / video in prompt order (an :class:`EncodedImages` list)."""
        if isinstance(pixel_values, (list, tuple)) and not pixel_values:
            return EncodedImages([])  # a text-only sample
        if not isinstance(pixel_values, VisualInputs):
            raise ValueError(
                f"{type(self).__name__} needs its processor's outputs, not bare pixels: pass "
                f"adapter.render_prompt(...).visual (a VisualInputs), e.g. forward(ids, pixel_values=prompt.visual)."
            )
        return self._encode_visual(pixel_values.to(self.device))

    def layouts_of(self, visual: VisualInputs | None) -> list[VisualLayout]:
        if visual is None or (isinstance(visual, (list, tuple)) and not visual):
            return []  # a text-only sample
        return self.visual_layouts(self.config, visual)

    def visual_grid(self, height: int, width: int) -> tuple[int, int] | None:
        """Plain patch grid of an image of ``height x width`` pixels (as given to the processor), or ``None``."""
        return self._layout_for_size(height, width).grid

    def num_visual_tokens(self, height: int, width: int) -> int:
        """Image-placeholder tokens an image of ``height x width`` pixels (as given to the processor) becomes."""
        return self._layout_for_size(height, width).num_tokens

    def _layout_for_size(self, height: int, width: int) -> VisualLayout:
        raise NotImplementedError
