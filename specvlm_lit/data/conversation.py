"""LLaVA-format conversations -> token ids with an assistant-only loss mask.

The text is tokenized piece by piece (user turn, " ASSISTANT:", " answer</s>") so the loss mask is exact. Each
``<image>`` placeholder of the user turns expands to the image tokens of the next image (any number of images, none
for a text-only conversation). Pieces are cut where the byte-level pre-tokenizer cuts anyway (before a space or at
a special token), so the ids equal those of the chat template's full string; a test checks this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError

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
