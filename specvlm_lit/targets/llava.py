"""LLaVA-1.5 (``llava``): the Vicuna v1 prompt format, visual-token counts and prompt building.

This module is the one owner of the format ``<s>USER: <image>\n{question} ASSISTANT: {answer}</s>`` used by
LLaVA-1.5 checkpoints (and the embedded target), for decoding prompts and for training conversations with an
assistant-only loss mask. The text is tokenized piece by piece (user turn, " ASSISTANT:", " answer</s>") so the loss
mask is exact. Each ``<image>`` placeholder of the user turns expands to the image tokens of the next image (any
number of images, none for a text-only conversation). Pieces are cut where the byte-level pre-tokenizer cuts anyway
(before a space or at a special token), so the ids equal those of the chat template's full string; a test checks this.

:class:`LlavaPromptProcessor` gives LLaVA-1.5 targets the prompt API every family has (``render`` /
``render_conversation`` -> :class:`~.inputs.PromptInputs`), so decoding and data code never branch on the family;
the base :class:`~specvlm_lit.target.TargetAdapter` (which *is* the LLaVA-1.5 adapter) delegates to it.
``specvlm_lit.data.conversation`` re-exports the conversation functions for the data pipeline.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .inputs import PromptInputs, VisualLayout

IMAGE_PLACEHOLDER = "<image>"
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ConversationError(UserError):
    """A conversation that cannot be trained on (no answer, bad roles, no image placeholder, ...).

    ``reason`` is the skip-count key the data pipeline files the sample under (see ``data/skips.py``).
    """

    def __init__(self, message: str, reason: str = "bad_conversation"):
        super().__init__(message)
        self.reason = reason


@dataclass
class EncodedConversation:
    input_ids: torch.Tensor  # [T] long
    loss_mask: torch.Tensor  # [T] bool: True where the token is an assistant-answer token to predict
    truncated: bool


def normalise(conversations: list[dict]) -> list[tuple[str, str]]:
    """Accept LLaVA ``{"from", "value"}`` or chat ``{"role", "content"}`` messages; validate turn order.

    Any other shape (``null``, a string, a list of strings, non-string roles) is a :class:`ConversationError`,
    never a ``TypeError``: shards come from outside and one odd record must not stop a run.
    """
    if not isinstance(conversations, list):
        raise ConversationError(f"conversations must be a list of messages, got {type(conversations).__name__}")
    turns = []
    for i, m in enumerate(conversations):
        if not isinstance(m, dict):
            raise ConversationError(f"message {i} is not a {{'from', 'value'}} object: {m!r:.80}")
        role = m.get("from", m.get("role"))
        role = ROLE_ALIASES.get(role) if isinstance(role, str) else None
        text = m.get("value", m.get("content"))
        if role is None or not isinstance(text, str):
            raise ConversationError(f"message {i} is not a human/gpt message with text: {m!r}")
        turns.append((role, text))
    if not turns or turns[0][0] != "user":
        raise ConversationError("a conversation must start with a human message")
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ConversationError(f"message {i} breaks the human/gpt alternation")
    return turns


def encode_conversation(
    conversations: list[dict],
    tokenizer,
    num_image_tokens: int | Sequence[int],
    *,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
) -> EncodedConversation:
    """Encode a conversation; each image placeholder expands to its image's number of image tokens.

    ``num_image_tokens``: one count per image, in placeholder order (a list; ``[]`` for a text-only conversation),
    or a single int for the one-image case (``0`` = no image). The conversation must hold exactly one ``<image>``
    placeholder per image.
    Training (``add_generation_prompt=False``) needs at least one non-empty assistant answer.
    Inference (``add_generation_prompt=True``) drops a trailing answer-less user turn's missing
    answer and ends with "ASSISTANT:" so the model continues with the answer.
    Over-long conversations are truncated at ``max_length`` (``truncated`` reports it); the image
    tokens are never cut, as a partial image cannot be scattered into.
    """
    turns = normalise(conversations)
    if not add_generation_prompt:
        if not any(role == "assistant" and text.strip() for role, text in turns):
            raise ConversationError("conversation has no assistant answer to learn from", reason="no_answer")
    image_token = getattr(tokenizer, "image_token", None) or IMAGE_PLACEHOLDER
    counts = image_token_counts(num_image_tokens)
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if n_placeholders != len(counts):
        raise ConversationError(
            f"expected exactly one {IMAGE_PLACEHOLDER} placeholder per image ({len(counts)} image(s)), "
            f"found {n_placeholders}"
        )
    pending = iter(counts)  # placeholders take the images in order, over all user turns

    def expand(text: str) -> str:
        pieces = text.split(IMAGE_PLACEHOLDER)
        return pieces[0] + "".join(image_token * next(pending) + piece for piece in pieces[1:])

    ids: list[int] = [tokenizer.bos_token_id]
    mask: list[bool] = [False]

    def add(text: str, learn: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([learn] * len(piece))

    for role, text in turns:
        if role == "user":
            add("USER: " + expand(text), False)
            add(" ASSISTANT:", False)
        else:
            add(" " + text, True)
            ids.append(tokenizer.eos_token_id)
            mask.append(True)
    input_ids = torch.tensor(ids, dtype=torch.long)
    loss_mask = torch.tensor(mask, dtype=torch.bool)
    truncated = False
    if max_length is not None and len(ids) > max_length:
        n_image_end = (
            int((input_ids == tokenizer.convert_tokens_to_ids(image_token)).nonzero().max()) + 1 if sum(counts) else 0
        )
        if max_length <= n_image_end:
            raise ConversationError(
                f"max_length={max_length} cannot hold the {sum(counts)} image tokens; "
                f"raise max_length above {n_image_end}",
                reason="image_exceeds_max_length",
            )
        input_ids, loss_mask, truncated = input_ids[:max_length], loss_mask[:max_length], True
    return EncodedConversation(input_ids, loss_mask, truncated)


def image_token_counts(num_image_tokens: int | Sequence[int]) -> list[int]:
    """Image tokens per image as a list: an int is the one-image form (``0`` = no image)."""
    if isinstance(num_image_tokens, int):
        return [num_image_tokens] if num_image_tokens > 0 else []
    return [int(n) for n in num_image_tokens]


def prompt_ids(question: str, tokenizer, num_image_tokens: int) -> torch.Tensor:
    """Ids of a single-turn prompt "<s>USER: <image>\\n{question} ASSISTANT:" ready for generation."""
    if not question or not question.strip():
        raise ConversationError("the prompt is empty: pass a question about the image")
    text = question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER}\n{question}"
    return encode_conversation(
        [{"from": "human", "value": text}], tokenizer, num_image_tokens, add_generation_prompt=True
    ).input_ids


# ------------------------------------------------------------------------------------ prompt API (every family)
def llava_layout(height: int, width: int, config) -> VisualLayout:
    """Token layout of one ``height x width`` image (as encoded) for a LLaVA-1.5 config: the patch grid, row-major,
    after a CLS token when the select strategy keeps it."""
    from ..target import llava_visual_grid, llava_visual_tokens

    patch, strategy = int(config.vision_config.patch_size), config.vision_feature_select_strategy
    llava_visual_tokens(height, width, patch, strategy)  # ValueError when smaller than one patch
    grid = llava_visual_grid(height, width, patch, strategy)
    if grid is not None:
        return VisualLayout([("grid", *grid)])
    return VisualLayout([("cls", 1, 1), ("grid", height // patch, width // patch)])


def llava_layouts(config, pixel_values) -> list[VisualLayout]:
    """One layout per image of LLaVA-1.5 pixels (``[B, 3, h, w]``, or a list of ``[3, h, w]`` / ``[k, 3, h, w]``)."""
    from ..target import image_list

    return [llava_layout(int(img.shape[-2]), int(img.shape[-1]), config) for img in image_list(pixel_values)]


def _vicuna_turns(messages: Sequence[dict]) -> tuple[list[dict], list]:
    """Chat messages (``{"role", "content"}``, content a string or ``{"type": "image"|"text"}`` items) -> LLaVA
    ``{"from", "value"}`` turns with ``<image>`` placeholders, and the images given inside the items.

    An image item becomes ``<image>`` followed by a newline (LLaVA-1.5 puts the image on its own line) unless the
    text after it already starts with whitespace; a string content is taken as LLaVA text as is."""
    turns, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConversationError(f"message {i} is not a {{'role', 'content'}} object: {message!r:.80}")
        role = message.get("role", message.get("from"))
        if role == "system":
            raise ConversationError(
                "LLaVA-1.5 targets use the Vicuna format without a system turn: remove the system message"
            )
        content = message.get("content", message.get("value"))
        if isinstance(content, str) or content is None:
            turns.append({"from": role, "value": content})
            continue
        pieces = []
        items = list(content)
        for j, item in enumerate(items):
            kind = item.get("type")
            if kind == "video" or "video" in item:
                raise ConversationError("llava targets take images only; remove the video or send frames as images")
            if kind == "image" or "image" in item:
                if item.get("image") is not None:
                    images.append(item["image"])
                nxt = items[j + 1] if j + 1 < len(items) else None
                follows = nxt is not None and nxt.get("type") == "text" and str(nxt.get("text", ""))[:1].isspace()
                pieces.append(IMAGE_PLACEHOLDER if follows or nxt is None else IMAGE_PLACEHOLDER + "\n")
            else:
                pieces.append(str(item.get("text", "")))
        turns.append({"from": role, "value": "".join(pieces)})
    return turns, images


class LlavaPromptProcessor:
    """The prompt API of every family (:class:`~.processor.FamilyProcessor`'s ``render`` / ``render_conversation``)
    for LLaVA-1.5: the Vicuna format above, images resized as the target encodes them
    (:func:`~specvlm_lit.target.resize_for_target`) and run through the checkpoint's image processor.

    ``PromptInputs.visual`` is what this family's ``encode_images`` takes: ``[N, 3, h, w]`` pixels (a list of
    ``[1, 3, h, w]`` when sizes differ); ``encoded_sizes`` are the ``(width, height)`` the images are encoded at.
    """

    def __init__(self, config, tokenizer, image_processor, hf_processor=None):
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor
        self.hf_processor = hf_processor  # the wrapped HF LlavaProcessor, if any

    def __getattr__(self, name):
        # Everything else is the HF processor's (patch_size, vision_feature_select_strategy, ...): code written for
        # an HF LlavaProcessor keeps working with this one.
        hf = self.__dict__.get("hf_processor")
        if hf is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(hf, name)

    @classmethod
    def load(cls, path, config) -> LlavaPromptProcessor:
        """Tokenizer + image processor from the checkpoint directory (``AutoProcessor``: LLaVA's needs no
        torchvision)."""
        from transformers import AutoProcessor

        from ..target import TargetLoadError

        try:
            processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means the directory lacks a usable processor
            raise TargetLoadError(
                f"cannot load the processor (tokenizer + image processor) from {path} "
                f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); save it next to the weights with "
                f"processor.save_pretrained('{path}')"
            ) from None
        return cls.wrap(processor, config, where=str(path))

    @classmethod
    def wrap(cls, processor, config, where: str = "the given processor") -> LlavaPromptProcessor:
        """From an HF ``LlavaProcessor`` (anything with ``tokenizer`` and ``image_processor``)."""
        from ..target import TargetLoadError

        tok, ip = getattr(processor, "tokenizer", None), getattr(processor, "image_processor", None)
        if tok is None or ip is None:
            raise TargetLoadError(
                f"{where} holds no tokenizer + image processor (got {type(processor).__name__}); save the target's "
                f"LlavaProcessor next to it"
            )
        return cls(config, tok, ip, processor)

    @classmethod
    def from_hf_processor(cls, processor) -> LlavaPromptProcessor:
        """From an in-memory HF ``LlavaProcessor`` alone, without the checkpoint (so without its model config): the
        patch size and feature-select strategy are the processor's own (what
        :func:`~specvlm_lit.target.visual_token_counter` reads), and images reach its image processor at their own
        size (the downscale of :func:`~specvlm_lit.target.resize_for_target` needs the vision tower's native size,
        a model fact; load the target directory instead to get it)."""
        from types import SimpleNamespace

        from ..target import visual_token_counter

        visual_token_counter(processor)  # the one-line TargetLoadError of a processor without a patch size
        strategy = getattr(processor, "vision_feature_select_strategy", None) or "default"
        # image_size: no native size known, so no image is ever longer than it (never downscaled)
        vision = SimpleNamespace(patch_size=int(processor.patch_size), image_size=sys.maxsize)
        return cls.wrap(processor, SimpleNamespace(vision_config=vision, vision_feature_select_strategy=strategy))

    def process_images(self, images: Sequence) -> tuple[object, list[tuple[int, int]], list[tuple[int, int]]]:
        """Pixels of ``images`` (PIL), the ``(width, height)`` each was handed to the image processor at and the
        ``(width, height)`` each is encoded at."""
        from ..target import resize_for_target

        pixels, given, encoded = [], [], []
        for image in images:
            image = resize_for_target(image.convert("RGB"), self.image_processor, self.config.vision_config)
            try:
                p = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
            except Exception as e:  # noqa: BLE001 - the processor's own refusal, as one line
                msg = f"the target's image processor rejected the image ({e})"
                raise ConversationError(msg, "corrupt_image") from None
            try:
                llava_layout(int(p.shape[-2]), int(p.shape[-1]), self.config)
            except ValueError as e:
                raise ConversationError(f"image too small for the target: {e}", "image_too_small") from None
            pixels.append(p)
            given.append(tuple(image.size))
            encoded.append((int(p.shape[-1]), int(p.shape[-2])))
        if len({tuple(p.shape) for p in pixels}) == 1:
            return torch.cat(pixels), given, encoded
        return pixels, given, encoded

    def render(self, messages, images=None, add_generation_prompt: bool = True, max_length=None) -> PromptInputs:
        turns, inline = _vicuna_turns(messages)
        images = list(inline) + list(images or [])
        visual, given, encoded = self.process_images(images) if images else (None, [], [])
        layouts = llava_layouts(self.config, visual) if images else []
        enc = encode_conversation(
            turns,
            self.tokenizer,
            [layout.num_tokens for layout in layouts],
            add_generation_prompt=add_generation_prompt,
            max_length=max_length,
        )
        return PromptInputs(
            input_ids=enc.input_ids[None],
            visual=visual,
            loss_mask=None if add_generation_prompt else enc.loss_mask[None],
            layouts=layouts,
            text=self.tokenizer.decode(enc.input_ids),
            input_sizes=given,
            encoded_sizes=encoded,
            truncated=enc.truncated,
        )

    def render_conversation(self, messages, images=None, max_length=None) -> PromptInputs:
        return self.render(messages, images, add_generation_prompt=False, max_length=max_length)

    def check_video(self) -> None:
        """LLaVA-1.5 takes images only: the clear error a video gets (the data pipeline counts it as a skip)."""
        from .processor import VideoUnsupportedError, video_model_types

        raise VideoUnsupportedError(
            "llava targets (LLaVA-1.5) take images only; remove the video or use a video family "
            f"({', '.join(video_model_types())})."
        )


def default_processor_dir(adapter) -> Path:
    """The directory a target adapter's model was loaded from (its processor files are there)."""
    from ..target import TargetLoadError

    path = getattr(adapter.model, "name_or_path", "") or ""
    if not path:
        raise TargetLoadError(
            f"{type(adapter).__name__} was built from an in-memory model, so its processor files are unknown: "
            f"call adapter.attach_processor(<the target's processor>)."
        )
    return Path(path)
