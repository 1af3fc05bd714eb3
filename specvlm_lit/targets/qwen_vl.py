"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: dynamic resolution, merged patches, multimodal RoPE (ChatML prompts).

Facts (transformers 5.23):

* the image processor resizes each image to multiples of ``patch_size * merge_size`` with its pixel count within
  ``[min_pixels, max_pixels]`` (``smart_resize``), and emits flattened patches ``pixel_values [patches,
  C * temporal_patch_size * p * p]`` plus ``image_grid_thw [N, 3]`` (an image is one temporal step, duplicated);
* an image becomes ``t * (h / m) * (w / m)`` tokens (``m = spatial_merge_size``): the merged patch grid, row-major,
  between ``<|vision_start|>`` and ``<|vision_end|>``;
* position ids are 3-section mRoPE (temporal, height, width; ``get_rope_index``): text advances all three by one
  per token; an image at text position ``s`` spans ``(s, s + row, s + col)`` and the text after it resumes at
  ``s + max(h, w) / m``. Every token after the prompt therefore sits at ``sequence index + rope_delta`` in all three
  sections (``rope_delta = max position + 1 - prompt length``, <= 0). The adapter stores the delta on the KV cache
  at prefill (an :class:`MRopeCache`, so a batched decoder that drops finished rows keeps every other row's
  delta), so ``tree_forward`` (and cached forwards) take the same 1-D ``prefix_len + depth`` positions as every
  other family and translate them here;
* the model computes those positions only when ``mm_token_type_ids`` (made by the processor: 1 on image tokens,
  2 on video tokens) is passed: without it transformers 5.23 silently falls back to 1-D positions and the output
  differs from the first token. The adapter derives the types from ``input_ids`` itself;
* Qwen3-VL also adds DeepStack features (vision-tower intermediate layers) to the hidden states of the first
  decoder layers at the visual positions, and interleaves the mRoPE sections.

Video (``pixel_values_videos`` + ``video_grid_thw``, the video processor's outputs): the vision tower encodes it like
an image whose ``t`` is the number of temporal patches (``temporal_patch_size`` frames each). Qwen2-VL / Qwen2.5-VL
expand ``<|video_pad|>`` into one run of ``t * (h / m) * (w / m)`` tokens, positioned ``(s + k * interval, s + row,
s + col)`` for temporal patch ``k`` (interval 1, Qwen2.5-VL: ``tokens_per_second * second_per_grid_ts``). Qwen3-VL
writes each temporal patch's time as text: the placeholder becomes ``<T seconds><|vision_start|>`` + one frame's
tokens + ``<|vision_end|>`` per temporal patch (inside the template's own vision_start / vision_end), so one video
is ``t`` runs, each positioned as a one-frame image (``get_rope_index`` splits the grid per frame).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import (
    DynamicCache,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from .family import FamilyAdapter, ImageTooSmallError
from .inputs import EncodedImages, VisualInputs, VisualLayout

__all__ = ["MRopeCache", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter", "QwenVLAdapter", "rope_deltas"]

# Attribute of the KV cache holding the prompt's mRoPE delta ([B, 1]); set at prefill, read by later forwards.
_ROPE_DELTAS = "_specvlm_rope_deltas"


def rope_deltas(cache) -> torch.Tensor | None:
    """The mRoPE delta a Qwen-VL prefill stored on ``cache`` (``None`` if none was stored)."""
    return getattr(cache, _ROPE_DELTAS, None)


class MRopeCache(DynamicCache):
    """A ``DynamicCache`` whose per-row mRoPE deltas follow its rows: when a batched decoder drops finished rows
    (``batch_select_indices``), the deltas are selected with the keys and values, so every remaining row keeps its own
    positions."""

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        delta = rope_deltas(self)
        if delta is not None:
            setattr(self, _ROPE_DELTAS, delta[indices.to(delta.device)])


def _real_tokens(position_ids: torch.Tensor) -> torch.Tensor:
    """The real-token mask ``[B, T]`` of a left-padded prompt batch whose 1-D ``position_ids`` index each row's real
    tokens (``0 .. n_b - 1`` at its end, as the batched decoder passes them): mRoPE positions are computed over each
    row's real tokens, and later 1-D positions (real-token indices) are shifted by that row's delta."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, T] or [3, B, T], got {tuple(position_ids.shape)}")
    width = position_ids.shape[1]
    lengths = position_ids[:, -1:] + 1
    expected = torch.arange(width, device=position_ids.device)[None] - (width - lengths)
    real = expected >= 0
    if bool((lengths > width).any()) or not torch.equal(position_ids[real], expected[real]):
        raise ValueError(
            "A prompt with visual tokens takes 1-D position_ids only as 0 .. n-1 over each row's real tokens (left "
            "padding): its mRoPE positions depend on the whole prompt (pass none, or 3-section [3, B, T])."
        )
    return real.long()


class QwenVLAdapter(FamilyAdapter):
    """Shared mRoPE machinery of the Qwen-VL families (not registered itself)."""

    default_image_token: ClassVar[str] = "<|image_pad|>"
    default_video_token: ClassVar[str] = "<|video_pad|>"
    supports_video: ClassVar[bool] = True

    # ------------------------------------------------------------------------------------------ layout facts
    @staticmethod
    def _merged(config, grid_thw: torch.Tensor | None) -> list[VisualLayout]:
        """One merged-patch layout per (t, h, w) row: ``t`` temporal patches of ``(h / m) x (w / m)`` tokens."""
        m = int(config.vision_config.spatial_merge_size)
        rows = [] if grid_thw is None else grid_thw.tolist()
        return [VisualLayout([("merged", h // m, w // m)], frames=t) for t, h, w in rows]

    @classmethod
    def image_layouts(cls, config, visual: VisualInputs) -> list[VisualLayout]:
        return cls._merged(config, visual.image_grid_thw)

    @classmethod
    def video_layouts(cls, config, visual: VisualInputs) -> list[list[VisualLayout]]:
        return [[layout] for layout in cls._merged(config, visual.video_grid_thw)]

    @classmethod
    def check_image_size(cls, height: int, width: int, config, image_processor) -> None:
        factor = int(image_processor.patch_size) * int(image_processor.merge_size)
        if min(height, width) < factor or max(height, width) > 200 * min(height, width):
            raise ImageTooSmallError(
                f"Image {width}x{height} (width x height) is too small or too elongated for {config.model_type}'s "
                f"processor: both sides must be at least {factor} pixels (patch_size x merge_size) and the aspect "
                f"ratio below 200. Use a larger image."
            )

    def _layout_for_size(self, height: int, width: int) -> VisualLayout:
        # The image processor's own resize rule (the PIL module imports without torchvision; both backends share it).
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.processor.image_processor
        self.check_image_size(height, width, self.config, ip)
        factor = int(ip.patch_size) * int(ip.merge_size)
        h, w = smart_resize(height, width, factor, ip.size["shortest_edge"], ip.size["longest_edge"])
        return VisualLayout([("merged", h // factor, w // factor)])

    # ------------------------------------------------------------------------------------------------ images
    def _encode_image_inputs(self, visual: VisualInputs) -> EncodedImages:
        if visual.image_grid_thw is None:
            raise ValueError(
                f"{self.config.model_type} needs image_grid_thw from its image processor (VisualInputs.image_grid_thw)."
            )
        out = self.model.model.get_image_features(
            pixel_values=visual.pixel_values.to(self.dtype), image_grid_thw=visual.image_grid_thw, return_dict=True
        )
        return self._encoded(out)

    def _encode_video_inputs(self, visual: VisualInputs) -> EncodedImages:
        if visual.video_grid_thw is None:
            raise ValueError(
                f"{self.config.model_type} needs video_grid_thw from its video processor (VisualInputs.video_grid_thw)."
            )
        out = self.model.model.get_video_features(
            pixel_values_videos=visual.pixel_values_videos.to(self.dtype),
            video_grid_thw=visual.video_grid_thw,
            return_dict=True,
        )
        return self._encoded(out)

    @staticmethod
    def _encoded(out) -> EncodedImages:
        deep = getattr(out, "deepstack_features", None)
        return EncodedImages(list(out.pooler_output), deepstack=None if deep is None else [list(f) for f in deep])

    # --------------------------------------------------------------------------------------------- positions
    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What the processor emits: 0 text, 1 image token, 2 video token (the model needs it for mRoPE)."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self.image_token_id] = 1
        video = getattr(self.config, "video_token_id", None)
        if video is not None:
            types[input_ids == int(video)] = 2
        return types

    def hf_generate_inputs(self, input_ids: torch.Tensor, visual: VisualInputs | None) -> dict:
        # mm_token_type_ids is what makes HF compute mRoPE (without it Qwen2.5-VL silently uses 1-D positions).
        return {**super().hf_generate_inputs(input_ids, visual), "mm_token_type_ids": self.mm_token_type_ids(input_ids)}

    def prompt_position_ids(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mRoPE positions ``[3, B, T]`` and ``rope_deltas [B, 1]`` of a whole prompt (``get_rope_index``)."""
        extra = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
        return self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=self.mm_token_type_ids(input_ids),
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
            **extra,
        )

    def _mrope(self, position_ids: torch.Tensor | None, n: int, batch: int, cache) -> torch.Tensor:
        """1-D sequence positions (default ``past .. past + n - 1``) -> 3-section positions after the prompt."""
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + n, device=self.device)[None].expand(batch, -1)
        delta = rope_deltas(cache) if cache is not None else None
        if delta is not None:
            if delta.shape[0] not in (1, position_ids.shape[0]):
                raise ValueError(
                    f"the KV cache holds mRoPE deltas of {delta.shape[0]} rows but this forward has "
                    f"{position_ids.shape[0]}: its rows were selected without their deltas; make the cache with "
                    f"adapter.new_cache() (an MRopeCache), whose batch_select_indices keeps them in step"
                )
            position_ids = position_ids + delta.to(position_ids.device)
        return position_ids[None].expand(3, *position_ids.shape)

    def new_cache(self) -> MRopeCache:
        """An empty cache that keeps each row's mRoPE delta with the row (:class:`MRopeCache`)."""
        return MRopeCache(config=self.text_config)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_features=None,
        pixel_values=None,
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """:meth:`TargetAdapter.forward` with mRoPE positions: a prompt with images gets ``get_rope_index``'s
        3-section positions (its delta stored on the cache); later chunks and 1-D ``position_ids`` are sequence
        indices shifted by that delta. 3-D ``position_ids`` ``[3, B, T]`` are used as given."""
        if image_features is not None and pixel_values is not None:
            raise ValueError("Pass either image_features or pixel_values, not both.")
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        ids = input_ids.to(self.device)
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        # Only a sequence's first forward places images; later chunks are text whatever their ids (as in HF's
        # generate, where a generated placeholder id is embedded as a token and positioned as text).
        visual = self.mm_token_type_ids(ids) != 0 if past == 0 else torch.zeros_like(ids, dtype=torch.bool)
        if position_ids is None or position_ids.dim() != 3:
            if bool(visual.any()):
                mask = None if attention_mask is None or attention_mask.dim() != 2 else attention_mask.to(self.device)
                if position_ids is not None:
                    mask = _real_tokens(position_ids.to(self.device))
                grids = {name: getattr(image_features, name, None) for name in EncodedImages._GRIDS}
                if grids["image_grid_thw"] is None and grids["video_grid_thw"] is None:
                    raise ValueError(
                        f"{self.config.model_type} needs each image's / video's grid for its positions: pass "
                        f"image_features from adapter.encode_images(prompt.visual) or pixel_values=prompt.visual."
                    )
                grids = {k: None if v is None else v.to(self.device) for k, v in grids.items()}
                position_ids, deltas = self.prompt_position_ids(ids, attention_mask=mask, **grids)
                if past_key_values is not None:
                    setattr(past_key_values, _ROPE_DELTAS, deltas)
            else:
                if past == 0 and past_key_values is not None:
                    setattr(past_key_values, _ROPE_DELTAS, None)  # a text-only prompt: plain positions
                position_ids = self._mrope(
                    None if position_ids is None else position_ids.to(self.device),
                    ids.shape[1],
                    ids.shape[0],
                    past_key_values,
                )
        self._pending = self._decoder_extras(ids, image_features, visual)
        try:
            return super().forward(
                input_ids,
                attention_mask=attention_mask,
                image_features=image_features,
                past_key_values=past_key_values,
                position_ids=position_ids,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        finally:
            self._pending = {}

    __call__ = forward

    def _decoder_extras(self, ids: torch.Tensor, image_features, visual: torch.Tensor) -> dict:
        """Extra keyword arguments the text decoder needs for this forward (Qwen3-VL: DeepStack)."""
        return {}

    def _decoder_forward(
        self, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, hidden_layers=()
    ):
        """The text decoder on ready embeddings with 3-section positions. 1-D positions (``tree_forward`` passes
        ``prefix_len + depth``) are translated with the delta stored on the cache."""
        if position_ids is None or position_ids.dim() == 2:
            position_ids = self._mrope(position_ids, inputs_embeds.shape[1], inputs_embeds.shape[0], past_key_values)
        extra = dict(getattr(self, "_pending", None) or {})
        if hidden_layers:
            extra["output_hidden_states"] = True
        # The text model directly: Qwen*VLModel.forward would recompute positions from its own stateful rope_deltas.
        out = self.model.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            return_dict=True,
            **extra,
        )
        if hidden_layers:
            return self._decoder_states(out.last_hidden_state, out.hidden_states, hidden_layers)
        return out.last_hidden_state


class Qwen2VLAdapter(QwenVLAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    model_class = Qwen2VLForConditionalGeneration


class Qwen2_5_VLAdapter(QwenVLAdapter):  # noqa: N801 - named like the HF class
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    model_class = Qwen2_5_VLForConditionalGeneration

    @classmethod
    def video_metadata_fields(cls, metadata, video_processor) -> dict:
        # Qwen2_5_VLProcessor: seconds per temporal patch = temporal_patch_size / sampled fps.
        return {"second_per_grid_ts": torch.tensor([video_processor.temporal_patch_size / metadata.sampled_fps])}


class Qwen3VLAdapter(QwenVLAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    model_class = Qwen3VLForConditionalGeneration

    @classmethod
    def video_layouts(cls, config, visual: VisualInputs) -> list[list[VisualLayout]]:
        # One run of tokens per temporal patch (the timestamp text separates them).
        videos = cls._merged(config, visual.video_grid_thw)
        return [[VisualLayout(layout.segments)] * layout.frames for layout in videos]

    @classmethod
    def video_metadata_fields(cls, metadata, video_processor) -> dict:
        from transformers import Qwen3VLProcessor

        fps = metadata.fps or _DEFAULT_FPS  # as Qwen3VLProcessor.replace_video_token
        times = Qwen3VLProcessor._calculate_timestamps(
            None, list(metadata.frames_indices), fps, video_processor.temporal_patch_size
        )
        return {"video_timestamps": [times]}

    @classmethod
    def video_token_ids(cls, config, tokenizer, visual: VisualInputs, index: int) -> list[int]:
        """``<T seconds><|vision_start|>`` + one temporal patch's video tokens + ``<|vision_end|>`` per patch."""
        runs = cls.video_layouts(config, visual)[index]
        times = frame_timestamps(visual, index, len(runs), int(config.vision_config.temporal_patch_size))
        video, start, end = cls.config_video_token_id(config), config.vision_start_token_id, config.vision_end_token_id
        out: list[int] = []
        for layout, seconds in zip(runs, times):
            stamp = tokenizer(f"<{seconds:.1f} seconds>", add_special_tokens=False)["input_ids"]
            out += [*stamp, start, *[video] * layout.num_tokens, end]
        return out

    def _decoder_extras(self, ids: torch.Tensor, image_features, visual: torch.Tensor) -> dict:
        deep = getattr(image_features, "deepstack", None)
        if not deep or not bool(visual.any()):
            return {}
        # DeepStack: layer l's features of every image / video, in placeholder order, added after decoder layer l.
        return {
            "visual_pos_masks": visual,
            "deepstack_visual_embeds": [torch.cat(layer, 0).to(self.device, self.dtype) for layer in deep],
        }


# Qwen3VLProcessor's fps when a video's metadata has none (pre-sampled frames): its timestamps then assume 24 fps.
_DEFAULT_FPS = 24.0


def frame_timestamps(visual: VisualInputs, index: int, steps: int, temporal_patch: int) -> list[float]:
    """Seconds of each temporal patch of video ``index`` (Qwen3-VL's prompt text): ``visual.video_timestamps`` when
    given, else HF's default for frames without metadata (frames ``0 .. temporal_patch * steps - 1`` at 24 fps, each
    patch at the mean time of its frames)."""
    if visual.video_timestamps is not None and visual.video_timestamps[index] is not None:
        times = list(visual.video_timestamps[index])
        if len(times) != steps:
            raise ValueError(
                f"video {index} has {steps} temporal patches but {len(times)} timestamps (video_timestamps gives one "
                f"time in seconds per temporal patch)."
            )
        return times
    from transformers import Qwen3VLProcessor

    frames = list(range(temporal_patch * steps))
    return Qwen3VLProcessor._calculate_timestamps(None, frames, _DEFAULT_FPS, temporal_patch)
