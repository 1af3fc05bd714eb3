"""Held-out accuracy of a target VLM on the synthetic test split.

A greedy answer counts as correct when it states every key fact of the question (colour+shape
names, counts, yes/no, spatial relation: the ``checks`` stored with each sample) and, for detailed
descriptions, names no colour+shape pair that is not in the image.
"""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict

import torch
import webdataset as wds
from PIL import Image

from ..data.conversation import prompt_ids
from ..synthetic.scenes import COLOURS, SHAPES
from ..target import TargetAdapter

_PAIR = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")


def answer_is_correct(answer: str, checks: list[str], task: str, scene: dict) -> bool:
    for fact in checks:
        if not re.search(r"\b" + re.escape(fact) + r"\b", answer, flags=re.IGNORECASE if fact.islower() else 0):
            return False
    if task == "describe":
        present = {f"{o['colour']} {o['shape']}" for o in scene["objects"]}
        if any(" ".join(m) not in present for m in _PAIR.findall(answer)):
            return False
    return True


def iter_test_samples(urls, limit: int | None = None):
    for i, s in enumerate(wds.WebDataset(urls, shardshuffle=False)):
        if limit is not None and i >= limit:
            return
        yield Image.open(io.BytesIO(s["png"])).convert("RGB"), json.loads(s["json"])


def answer(adapter: TargetAdapter, processor, image: Image.Image, question: str, max_new_tokens: int,
           temperature: float = 0.0) -> str:
    """The target's answer via HF ``generate`` (greedy, or sampled at ``temperature``) on adapter-encoded images."""
    tok = processor.tokenizer
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    feats = adapter.encode_images(pixels)
    ids = prompt_ids(question, tok, feats[0].shape[0]).unsqueeze(0)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = adapter.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 mm_encoder_outputs=adapter.as_mm_encoder_outputs(feats),
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def evaluate(model, processor, urls, *, limit: int | None = None, max_new_tokens: int = 128, log=None) -> dict:
    adapter = TargetAdapter(model)
    per_task: dict[str, list[int]] = defaultdict(list)
    exact = []
    examples = []
    for image, rec in iter_test_samples(urls, limit):
        question = rec["conversations"][0]["value"]
        reference = rec["conversations"][1]["value"]
        reply = answer(adapter, processor, image, question, max_new_tokens)
        ok = answer_is_correct(reply, rec["checks"][0], rec["tasks"][0], rec["scene"])
        per_task[rec["tasks"][0]].append(int(ok))
        exact.append(int(reply == reference))
        if len(examples) < 8:
            examples.append({"id": rec["id"], "question": question, "answer": reply, "reference": reference, "correct": ok})
        if log and len(exact) % 64 == 0:
            log(f"evaluated {len(exact)} samples")
    total = [x for v in per_task.values() for x in v]
    return {
        "samples": len(total),
        "accuracy": sum(total) / max(1, len(total)),
        "per_task": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(per_task.items())},
        "exact_match": sum(exact) / max(1, len(exact)),
        "examples": examples,
    }
