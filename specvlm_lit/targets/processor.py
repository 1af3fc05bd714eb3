"""Prompt building for every family from the checkpoint's own files, without ``AutoProcessor``.

``AutoProcessor.from_pretrained`` cannot be used on a CPU-only install: the Qwen-VL and LLaVA-OneVision processors
cannot even be constructed without their video processor, which needs torchvision (whose registry build links CUDA
libraries and fails to import beside the CPU torch). :class:`FamilyProcessor` therefore loads exactly what images
need (the tokenizer, the checkpoint's chat template, the image processor) and does the one thing the HF processor
adds on top, expanding each image placeholder into the image's visual tokens, with the counts owned by the family
adapter (:meth:`~specvlm_lit.targets.family.FamilyAdapter.image_layouts`).

Videos come either already processed (a :class:`VisualInputs` with ``pixel_values_videos`` / ``video_grid_thw``, as
the family's HF video processor makes them: how the tests run video on CPU) or raw (frames), which go through the
checkpoint's HF video processor where torchvision imports and fail with one clear line naming torchvision where it
does not. Images and videos keep the order their placeholders have in the rendered prompt (``VisualInputs.order``).

Prompts (decoding) and conversations (training, with the assistant-only loss mask over multi-turn dialogues) are
rendered with the checkpoint's chat template, so every family gets exactly its own format (ChatML, ``[INST]``, ...).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import UserError
from .inputs import PromptInputs, VisualInputs

__all__ = ["FamilyProcessor", "PromptError", "VideoUnsupportedError", "as_prompt_builder", "load_prompt_builder"]


class PromptError(UserError):
    """A prompt / conversation / image cannot be turned into model inputs for this target."""


class VideoUnsupportedError(PromptError):
    """Video was given to a target (or an install) that cannot take it."""

    reason = "video_unsupported"  # the data pipeline's skip-count key (a video sample for an image-only target)


class VideoProcessorUnavailable(VideoUnsupportedError):
    """Raw video cannot be processed by this install (no torchvision) or processor (no checkpoint directory): a
    fact of the machine, not of one sample, so the data pipeline stops on it instead of skipping every video."""


def video_model_types() -> list[str]:
    """The registered families whose checkpoints take video."""
    from ..target import _ADAPTERS

    return sorted(name for name, cls in _ADAPTERS.items() if getattr(cls, "supports_video", False))


def _torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _visual_items(messages: Sequence[dict]) -> tuple[list, list, bool]:
    """Images and videos embedded in the messages' content items (``{"type": "image", "image": PIL}``,
    ``{"type": "video", "video": frames or VisualInputs}``), and whether any video item is present."""
    images, videos, video = [], [], False
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        for item in content:
            kind = item.get("type")
            if kind == "video" or "video" in item:
                video = True
                if item.get("video") is not None:
                    videos.append(item["video"])
            elif (kind == "image" or "image" in item) and item.get("image") is not None:
                images.append(item["image"])
    return images, videos, video


_ROLES = {"human": "user", "gpt": "assistant"}
#: LLaVA-format data marks each image's (video's) place in the text with these (LLaVA-Video uses ``<video>``).
_PLACEHOLDERS = {"<image>": "image", "<video>": "video"}
_PLACEHOLDER_SPLIT = re.compile("(" + "|".join(map(re.escape, _PLACEHOLDERS)) + ")")


def as_chat(messages: Sequence[dict]) -> list[dict]:
    """Messages in the chat-template form: LLaVA-format records (``{"from": "human", "value": "<image>\\nQ"}``) become
    ``{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}`` (``<video>`` likewise
    becomes a ``{"type": "video"}`` item; the newline LLaVA puts after one is its own formatting, dropped); a string
    content becomes one text item; item lists stay as they are."""
    out = []
    for message in messages:
        role = message.get("role", message.get("from"))
        role = _ROLES.get(role, role)
        content = message.get("content", message.get("value"))
        if isinstance(content, str):  # as items: several real templates (LLaVA-NeXT's) iterate the content
            items, after_visual = [], False
            for piece in _PLACEHOLDER_SPLIT.split(content):
                if piece in _PLACEHOLDERS:
                    items.append({"type": _PLACEHOLDERS[piece]})
                    after_visual = True
                    continue
                piece = piece[1:] if after_visual and piece.startswith("\n") else piece
                after_visual = False
                if piece:
                    items.append({"type": "text", "text": piece})
            content = items
        out.append(
            {**{k: v for k, v in message.items() if k not in ("from", "value")}, "role": role, "content": content}
        )
    return out


class FamilyProcessor:
    """Tokenizer + chat template + image processor of one target checkpoint, driven by its family adapter class.

    Build with :meth:`load` (from the checkpoint directory) or directly from the pieces.
    """

    def __init__(self, adapter_cls, config, tokenizer, image_processor, chat_template: str | None, path=None):
        self.adapter_cls = adapter_cls
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.path = path  # the checkpoint directory (its video processor is loaded from it on first raw video)
        self._video_processor = None
        self.image_token = adapter_cls.image_token_string(tokenizer)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = adapter_cls.config_video_token_id(config)
        self.video_token = adapter_cls.video_token_string(tokenizer) if self.video_token_id is not None else None
        self._check_against_model()

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path, adapter_cls=None) -> FamilyProcessor:
        """Load from a local checkpoint directory (never the network); the family comes from its config.json."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        from ..target import _ADAPTERS, TargetLoadError, supported_model_types

        path = Path(path).expanduser()
        raw = _read_target_config(path)
        if adapter_cls is None:
            adapter_cls = _ADAPTERS.get(raw["model_type"])
            if adapter_cls is None or not hasattr(adapter_cls, "image_layouts"):
                raise TargetLoadError(
                    f"{path / 'config.json'} has model_type={raw['model_type']!r}, which has no prompt builder "
                    f"(supported: {', '.join(supported_model_types())})."
                )
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise TargetLoadError(
                f"Cannot load the tokenizer of {path} ({' '.join(str(e).split())[:200]}). Copy the checkpoint's "
                f"tokenizer files (tokenizer.json, tokenizer_config.json) next to config.json."
            ) from e
        if not (path / "preprocessor_config.json").is_file():
            raise TargetLoadError(
                f"{path} has no preprocessor_config.json, so images cannot be prepared for it. Copy the "
                f"checkpoint's preprocessor_config.json next to config.json."
            )
        # Without torchvision transformers falls back to the PIL image processors, which is what CPU installs need.
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return cls(adapter_cls, config, tokenizer, image_processor, cls._read_chat_template(path, tokenizer), path)

    @staticmethod
    def _read_chat_template(path: Path, tokenizer) -> str | None:
        """The checkpoint's chat template: ``chat_template.jinja``, ``chat_template.json`` (older repos) or the
        tokenizer's own."""
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        as_json = path / "chat_template.json"
        if as_json.is_file():
            return json.loads(as_json.read_text(encoding="utf-8"))["chat_template"]
        return getattr(tokenizer, "chat_template", None)

    def _check_against_model(self) -> None:
        """The tokenizer must index the model's embedding and use the model's image token id (classic mistake: a
        base-LLM tokenizer or another size's processor)."""
        from ..target import TargetLoadError

        model_id = int(self.adapter_cls.config_image_token_id(self.config))
        fix = "Use the tokenizer and processor files saved with this target checkpoint."
        if self.image_token_id is None or self.image_token_id == getattr(self.tokenizer, "unk_token_id", -1):
            raise TargetLoadError(
                f"The tokenizer has no image token {self.image_token!r} (the model's image_token_id is {model_id}). "
                f"{fix}"
            )
        if int(self.image_token_id) != model_id:
            raise TargetLoadError(
                f"The processor's image token {self.image_token!r} has id {self.image_token_id} but the model's "
                f"config.image_token_id is {model_id}. {fix}"
            )
        video_id = None if self.video_token is None else self.tokenizer.convert_tokens_to_ids(self.video_token)
        if video_id != self.video_token_id:
            raise TargetLoadError(
                f"The processor's video token {self.video_token!r} has id {video_id} but the model's video token id "
                f"is {self.video_token_id}. {fix}"
            )
        n_tok, n_emb = len(self.tokenizer), int(self.config.get_text_config().vocab_size)
        if n_tok > n_emb:
            raise TargetLoadError(
                f"The tokenizer has {n_tok} tokens but the model's vocabulary (text_config.vocab_size) has only "
                f"{n_emb}. {fix}"
            )

    # ------------------------------------------------------------------------------------------------- images
    def process_images(self, images: Sequence) -> VisualInputs:
        """Run the image processor on PIL images (one prompt); checks sizes first (clear error when too small)."""
        for image in images:
            width, height = image.size
            self.adapter_cls.check_image_size(height, width, self.config, self.image_processor)
        images = [image.convert("RGB") for image in images]
        # One nested list = one sample's images (LLaVA-OneVision does not tile when a sample has several);
        # channels_last stated explicitly: a 3-pixel-tall image would otherwise be read as channels-first.
        extra = self.adapter_cls.image_processor_kwargs(self.config, self.image_processor)
        out = self.image_processor(images=[images], return_tensors="pt", input_data_format="channels_last", **extra)
        return VisualInputs.from_processor(out)

    def check_video(self) -> None:
        """Raise the clear error a video gets from an image-only family."""
        if not getattr(self.adapter_cls, "supports_video", False):
            raise VideoUnsupportedError(
                f"{self.config.model_type} targets take images only; remove the video or use a video family "
                f"({', '.join(video_model_types())})."
            )

    def process_videos(self, videos: Sequence) -> VisualInputs | None:
        """One prompt's videos as one :class:`VisualInputs` (video fields only), in order: processed inputs are taken
        as they are, raw videos (frames) go through the checkpoint's HF video processor (needs torchvision)."""
        parts = [v if isinstance(v, VisualInputs) else self._process_raw_video(v) for v in videos]
        for part in parts:
            if part.pixel_values_videos is None or part.pixel_values is not None:
                raise PromptError(
                    "A processed video must be a VisualInputs with pixel_values_videos (and, for Qwen-VL, "
                    "video_grid_thw) and no image fields, as the family's video processor returns them."
                )
        return VisualInputs.concat(parts) if parts else None

    def _process_raw_video(self, video) -> VisualInputs:
        """The HF video processor on one raw video (frames, or a file's path). The processor itself needs torchvision,
        which the CPU test install cannot import: the tests check this path with a stand-in processor."""
        family = self.config.model_type
        if self._video_processor is None:
            if not _torchvision_available():
                raise VideoProcessorUnavailable(
                    f"Video input for {family} needs torchvision (Hugging Face's video processors require it) and it "
                    f"is not installed. Install a torchvision build matching your torch (a CPU build on CPU "
                    f"machines), or pass already-processed video inputs (VisualInputs with pixel_values_videos)."
                )
            if self.path is None:
                raise VideoProcessorUnavailable(
                    f"This {family} processor was built without its checkpoint directory, so its video processor "
                    f"cannot be loaded: use FamilyProcessor.load(<checkpoint dir>) or pass processed video inputs."
                )
            from transformers import AutoVideoProcessor

            self._video_processor = AutoVideoProcessor.from_pretrained(self.path, local_files_only=True)
        try:
            out = self._video_processor(videos=[video], return_tensors="pt", return_metadata=True)
        except ImportError as e:  # a missing decoder (PyAV, decord, torchcodec) is the install's fault, not the clip's
            raise VideoProcessorUnavailable(f"The {family} video processor cannot decode video here: {e}") from None
        except Exception as e:  # decoders raise many types for a broken file: name it, the data pipeline counts it
            error = PromptError(f"The video cannot be decoded or processed: {type(e).__name__}: {e}")
            error.reason = "corrupt_video"
            raise error from None
        visual = VisualInputs.from_processor(out)
        metadata = out.get("video_metadata")
        extra = self.adapter_cls.video_metadata_fields(metadata[0], self._video_processor) if metadata else {}
        return replace(visual, **extra)

    # ------------------------------------------------------------------------------------------------ prompts
    def _template(self, messages, add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise PromptError(
                f"The target checkpoint ({self.config.model_type}) ships no chat template (chat_template.jinja / "
                f"chat_template.json / tokenizer_config.json), so prompts cannot be built in its format."
            )
        return self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def render(self, messages: Sequence[dict], images: Sequence | None = None, add_generation_prompt=True, videos=None):
        """A decoding prompt: the chat template applied to ``messages``, image and video placeholders expanded.

        Images come inside the content items (``{"type": "image", "image": <PIL>}``) or, for items without one,
        from ``images`` in order; videos likewise (``{"type": "video", "video": ...}`` / ``videos``), each either
        already processed (a :class:`VisualInputs` with ``pixel_values_videos`` + ``video_grid_thw``; Qwen2.5-VL
        also ``second_per_grid_ts``, Qwen3-VL optionally ``video_timestamps``) or raw frames (needs torchvision).
        """
        return self._encode(messages, images, videos, add_generation_prompt=add_generation_prompt, with_loss_mask=False)

    def render_conversation(
        self, messages: Sequence[dict], images: Sequence | None = None, max_length=None, videos=None
    ):
        """A training conversation (any number of turns): ids + ``loss_mask`` True on every assistant turn's tokens
        (its end-of-turn token included), False on system / user turns, template scaffolding and visual tokens."""
        if not any(m.get("role", m.get("from")) in ("assistant", "gpt") for m in messages):
            error = PromptError("The conversation has no assistant turn, so there is nothing to learn from it.")
            error.reason = "no_answer"  # the data pipeline's skip-count key
            raise error
        out = self._encode(messages, images, videos, add_generation_prompt=False, with_loss_mask=True)
        if max_length is not None and out.input_ids.shape[1] > max_length:
            visual = torch.isin(out.input_ids[0], torch.tensor(self._placeholder_ids)).nonzero()
            end = int(visual.max()) + 1 if visual.numel() else 0
            if max_length <= end:
                from .llava import ConversationError

                raise ConversationError(
                    f"max_length={max_length} cannot hold the {visual.numel()} visual tokens; raise max_length above "
                    f"{end}",
                    reason="image_exceeds_max_length",
                )
            out.input_ids, out.loss_mask = out.input_ids[:, :max_length], out.loss_mask[:, :max_length]
            out.truncated = True
        return out

    def _assistant_spans(self, messages, full: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in ``full``: what each assistant message adds to the rendering
        of the dialogue before it, starting where it departs from that dialogue's generation prompt.

        Some real templates render an assistant turn's header differently from their generation prompt
        (LLaVA-OneVision: ``"<|im_start|>assistant "`` + ``"\\n" + text`` vs ``"<|im_start|>assistant\\n"``), so the
        span starts at the first character where the two differ, never before the previous turns' text.
        """
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            previous = self._template(messages[:i], add_generation_prompt=False) if i else ""
            prompt = self._template(messages[:i], add_generation_prompt=True) if i else ""
            upto = self._template(messages[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(previous) and full.startswith(upto)):
                raise PromptError(
                    f"The chat template of this {self.config.model_type} target does not render conversations "
                    f"incrementally (turn {i} changes the text before it), so the assistant-only loss mask cannot "
                    f"be located."
                )
            start = len(os.path.commonprefix([prompt, upto]))
            spans.append((max(start, len(previous)), len(upto)))
        return spans

    @property
    def _placeholder_ids(self) -> list[int]:
        """Every id of a run of visual tokens (image / video tokens, and the family's in-run text tokens)."""
        return list(self.adapter_cls.run_token_ids(self.config, self.tokenizer))

    def _encode(self, messages, images, videos, *, add_generation_prompt: bool, with_loss_mask: bool) -> PromptInputs:
        messages = as_chat(messages)
        inline, inline_videos, video_items = _visual_items(messages)
        videos = [videos] if isinstance(videos, VisualInputs) else list(videos or [])
        if video_items or videos:
            self.check_video()
        images = list(inline) + list(images or [])
        text = self._template(messages, add_generation_prompt)
        # As HF's processor.apply_chat_template(tokenize=True): a template that writes the BOS token itself (Mistral
        # 3) is tokenized without the tokenizer adding a second one.
        bos = self.tokenizer.bos_token
        enc = self.tokenizer(
            text,
            return_offsets_mapping=with_loss_mask,
            add_special_tokens=not (bos is not None and text.startswith(bos)),
        )
        ids = list(enc["input_ids"])
        n_placeholders = ids.count(self.image_token_id)
        if n_placeholders != len(images):
            raise PromptError(
                f"The prompt has {n_placeholders} image placeholder(s) but {len(images)} image(s) were given; give "
                f"one image per {{'type': 'image'}} content item."
            )
        image_inputs = self.process_images(images) if images else None
        video_inputs = self.process_videos(list(inline_videos) + videos)
        n_videos = 0 if video_inputs is None else video_inputs.count("video")
        if self.video_token_id is not None and ids.count(self.video_token_id) != n_videos:
            raise PromptError(
                f"The prompt has {ids.count(self.video_token_id)} video placeholder(s) but {n_videos} video(s) were "
                f"given; give one video per {{'type': 'video'}} content item."
            )
        image_layouts = iter(self.adapter_cls.image_layouts(self.config, image_inputs) if images else [])
        video_layouts = self.adapter_cls.video_layouts(self.config, video_inputs) if n_videos else []
        learn = [False] * len(ids)
        if with_loss_mask:
            spans = self._assistant_spans(messages, text)
            for t, (s, e) in enumerate(enc["offset_mapping"]):
                learn[t] = e > s and any(a <= s and e <= b for a, b in spans)
        out_ids, out_mask, layouts, order = [], [], [], []
        for tok, lm in zip(ids, learn):
            if tok == self.image_token_id:
                layouts.append(next(image_layouts))
                expanded = self.adapter_cls.image_token_ids(self.config, self.tokenizer, layouts[-1])
            elif tok == self.video_token_id:
                k = len(order) - order.count("image")
                layouts += video_layouts[k]
                expanded = self.adapter_cls.video_token_ids(self.config, self.tokenizer, video_inputs, k)
            else:
                out_ids.append(tok)
                out_mask.append(lm)
                continue
            order.append("image" if tok == self.image_token_id else "video")
            out_ids += expanded
            out_mask += [False] * len(expanded)
        return PromptInputs(
            input_ids=torch.tensor([out_ids], dtype=torch.long),
            visual=_joined(image_inputs, video_inputs, tuple(order)) if n_videos else image_inputs,
            loss_mask=torch.tensor([out_mask]) if with_loss_mask else None,
            layouts=layouts,
            text=text,
        )


def _joined(images: VisualInputs | None, videos: VisualInputs | None, order: tuple[str, ...]) -> VisualInputs | None:
    """A prompt's image and video inputs as one :class:`VisualInputs` that remembers their prompt order."""
    if images is None and videos is None:
        return None
    video_fields = {} if videos is None else {name: getattr(videos, name) for name in VisualInputs._VIDEO_FIELDS}
    timestamps = None if videos is None else videos.video_timestamps
    return replace(images or VisualInputs(), **video_fields, video_timestamps=timestamps, order=order)


def _read_target_config(path: Path) -> dict:
    """The parsed ``config.json`` of the target checkpoint directory ``path`` (one-line TargetLoadError if bad)."""
    from ..target import TargetLoadError, read_model_config

    return read_model_config(
        path / "config.json",
        TargetLoadError,
        missing="Pass the target checkpoint directory.",
        fix="Restore config.json from the original checkpoint.",
    )


def load_prompt_builder(path):
    """The prompt builder of the target checkpoint at ``path`` (no model loaded): :class:`FamilyProcessor` for the
    families with an adapter in this package, the Vicuna-format :class:`~.llava.LlavaPromptProcessor` for LLaVA-1.5.
    Both have ``tokenizer``, ``image_processor``, ``render`` and ``render_conversation``."""
    from transformers import AutoConfig

    from ..target import _ADAPTERS, TargetLoadError, supported_model_types
    from .llava import LlavaPromptProcessor

    path = Path(path).expanduser()
    raw = _read_target_config(path)
    adapter_cls = _ADAPTERS.get(raw["model_type"])
    if adapter_cls is None:
        raise TargetLoadError(
            f"{path / 'config.json'} has model_type={raw['model_type']!r}, which has no adapter "
            f"(supported: {', '.join(supported_model_types())})."
        )
    if hasattr(adapter_cls, "image_layouts"):
        return FamilyProcessor.load(path, adapter_cls)
    return LlavaPromptProcessor.load(path, AutoConfig.from_pretrained(path, local_files_only=True))


def as_prompt_builder(processor):
    """The prompt builder for what a caller holds as "the target's processor": a target checkpoint directory
    (:func:`load_prompt_builder`), a prompt builder (returned as it is), or an in-memory Hugging Face LLaVA-1.5
    processor (:meth:`~.llava.LlavaPromptProcessor.from_hf_processor`)."""
    if isinstance(processor, (str, os.PathLike)):
        return load_prompt_builder(processor)
    if callable(getattr(processor, "render_conversation", None)):
        return processor
    from .llava import LlavaPromptProcessor

    return LlavaPromptProcessor.from_hf_processor(processor)
