"""Pruned draft vocabularies (EAGLE-3 ``d2t`` / ``t2d``) from the token frequencies of the training data.

A drafter with its own LM head may predict only the ``Vd`` most frequent answer tokens: its head shrinks from
``V`` to ``Vd`` rows, and tokens outside the draft vocabulary get draft probability 0 (decoding stays lossless:
the target still verifies, and speculative sampling's residual covers them). The mapping is stored as in the
serving formats: ``d2t[i] = target_id(i) - i`` (int64, ``Vd``) and ``t2d`` (bool, ``V``: in the draft vocabulary?).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

__all__ = ["answer_token_counts", "d2t_t2d", "most_frequent"]


def most_frequent(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` token ids with the highest counts (ties: lower id first), ascending."""
    v = counts.numel()
    if not 1 <= size <= v:
        raise ValueError(f"draft vocabulary size must be in [1, {v}] (the target vocabulary), got {size}")
    # Stable sort on -count keeps ids in ascending order among equal counts.
    order = torch.sort(-counts.to(torch.float64), stable=True).indices
    return torch.sort(order[:size]).values


def d2t_t2d(token_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d2t, t2d)`` for the ascending target ids ``token_ids`` of a draft vocabulary."""
    ids = token_ids.to(torch.long)
    if ids.numel() and (bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0 or int(ids[-1]) >= vocab_size):
        raise ValueError("draft vocabulary ids must be strictly ascending target ids")
    d2t = ids - torch.arange(ids.numel(), dtype=torch.long)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


def answer_token_counts(
    shards: Iterable[str], prompts, vocab_size: int, *, max_samples: int | None = None, max_length: int | None = None
) -> torch.Tensor:
    """How often each token id occurs in the assistant answers (the loss positions) of the LLaVA-format webdataset
    ``shards``: ``[vocab_size]`` int64. ``prompts`` is the target family's prompt builder (``SampleEncoder.prompts``):
    answers are rendered with the family's own chat template, so its end-of-turn token (Vicuna's ``</s>``, ChatML's
    ``<|im_end|>``, ...) is counted like any answer token. Reads only the ``.json`` members: image placeholders are
    dropped from the user turns (the loss positions do not depend on the images), so no image is decoded."""
    import webdataset as wds

    from ..data.conversation import IMAGE_PLACEHOLDER, ConversationError, normalise
    from ..targets import PromptError

    counts = torch.zeros(vocab_size, dtype=torch.long)
    seen = 0
    for shard in shards:
        for sample in wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter([{"url": shard}])):
            if "json" not in sample:
                continue
            try:
                record = json.loads(sample["json"])
                messages = [
                    {"role": role, "content": text.replace(IMAGE_PLACEHOLDER, "").strip()}
                    for role, text in normalise(record["conversations"])
                ]
                enc = prompts.render_conversation(messages, None, max_length=max_length)
            except (ValueError, KeyError, TypeError, AttributeError, ConversationError, PromptError):
                continue  # the data pipeline skips (and counts) such samples too
            ids = enc.input_ids[0][enc.loss_mask[0].bool()]
            counts += torch.bincount(ids.clamp(0, vocab_size - 1), minlength=vocab_size)[:vocab_size]
            seen += 1
            if max_samples is not None and seen >= max_samples:
                return counts
    return counts
