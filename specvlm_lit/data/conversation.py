"""LLaVA-format conversations -> token ids with an assistant-only loss mask (the data pipeline's names).

The Vicuna format itself is a fact of the LLaVA-1.5 family, owned by :mod:`specvlm_lit.targets.llava`; this module
re-exports its conversation functions under their historical names, so shards, conversion and recipes keep
importing them from here and the embedded target's tokens stay byte-identical.
"""

from __future__ import annotations

from ..targets.llava import (
    IMAGE_PLACEHOLDER,
    ROLE_ALIASES,
    ConversationError,
    EncodedConversation,
    encode_conversation,
    image_token_counts,
    normalise,
    prompt_ids,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "ROLE_ALIASES",
    "ConversationError",
    "EncodedConversation",
    "encode_conversation",
    "image_token_counts",
    "normalise",
    "prompt_ids",
]
