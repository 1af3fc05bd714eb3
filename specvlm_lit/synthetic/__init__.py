"""Synthetic visual-instruction data: coloured-shape scenes, LLaVA-format conversations, webdataset shards."""

from .generate import CorpusSpec, ensure_corpus, generate_corpus, make_sample
from .scenes import HELD_OUT_PAIRS, Scene, render, sample_scene
from .tasks import TASKS

__all__ = [
    "CorpusSpec",
    "ensure_corpus",
    "generate_corpus",
    "make_sample",
    "HELD_OUT_PAIRS",
    "Scene",
    "render",
    "sample_scene",
    "TASKS",
]
