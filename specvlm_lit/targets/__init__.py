"""Family adapters (one module per VLM family), registered by ``model_type`` on import.

``TargetAdapter.from_pretrained(<dir>)`` picks the family from the checkpoint's ``config.json``; ``target.py``
imports this package at its end so every family is registered whenever the base is.
"""

from . import llava, llava_next, llava_onevision, mistral3, qwen_vl  # noqa: F401 - registers the adapters
from .family import FamilyAdapter, ImageTooSmallError
from .inputs import EncodedImages, GridPiece, PromptInputs, VisualInputs, VisualLayout
from .llava import LlavaPromptProcessor
from .processor import (
    FamilyProcessor,
    PromptError,
    VideoProcessorUnavailable,
    VideoUnsupportedError,
    as_prompt_builder,
    load_prompt_builder,
)

__all__ = [
    "EncodedImages",
    "FamilyAdapter",
    "FamilyProcessor",
    "GridPiece",
    "ImageTooSmallError",
    "LlavaPromptProcessor",
    "PromptError",
    "PromptInputs",
    "VideoProcessorUnavailable",
    "VideoUnsupportedError",
    "VisualInputs",
    "VisualLayout",
    "as_prompt_builder",
    "load_prompt_builder",
]
