"""Held-out accuracy of a target VLM on the synthetic test split.

A greedy answer counts as correct when it states every key fact of the question (colour+shape
names, counts, yes/no, spatial relation: the ``checks`` stored with each sample) and, for detailed
descriptions, names no colour+shape pair that is not in the image.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image

from specvlm_lit.data.conversation import prompt_ids
from specvlm_lit.synthetic.samples import iter_test_samples
from specvlm_lit.synthetic.scenes import COLOURS, HELD_OUT_PAIRS, SHAPES
from specvlm_lit.target import TargetAdapter

from . import CONF_DIR

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


def object_naming(answer: str, scene: dict) -> list[tuple[bool, bool]]:
    """Per object of ``scene``: (its colour+shape pair is held out, the answer names that pair)."""
    return [
        ((o["colour"], o["shape"]) in HELD_OUT_PAIRS, re.search(rf"\b{o['colour']} {o['shape']}\b", answer) is not None)
        for o in scene["objects"]
    ]


def question_kind(task: str, checks: list[str], question: str) -> str:
    """Finer label than the task: which way of asking an answer got wrong.

    Read off the stored checks; count checks hold only the number, so counts look at the question's
    words (plural shape nouns such as "circles" contain the shape name).
    """
    if task == "attribute":
        if checks[0] in ("Yes", "No"):
            return f"attribute/exists-{checks[0].lower()}"
        return "attribute/colour" if checks[0] in COLOURS else "attribute/shape"
    if task == "spatial":
        return "spatial/relation" if len(checks) == 3 else "spatial/cell"
    if task == "count":
        words = set(re.findall(r"[a-z]+", question.lower()))
        return (
            "count/colour"
            if words & set(COLOURS)
            else "count/shape"
            if any(w.startswith(s) for w in words for s in SHAPES)
            else "count/total"
        )
    return task


def answer(
    adapter: TargetAdapter, processor, image: Image.Image, question: str, max_new_tokens: int, temperature: float = 0.0
) -> str:
    """The target's answer via HF ``generate`` (greedy, or sampled at ``temperature``) on adapter-encoded images."""
    tok = processor.tokenizer
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    feats = adapter.encode_images(pixels)
    ids = prompt_ids(question, tok, feats[0].shape[0]).unsqueeze(0)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    )
    out = adapter.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_encoder_outputs=adapter.as_mm_encoder_outputs(feats),
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        **sampling,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def evaluate(model, processor, urls, *, limit: int | None = None, max_new_tokens: int = 128, log=None) -> dict:
    adapter = TargetAdapter(model)
    per_task: dict[str, list[int]] = defaultdict(list)
    per_kind: dict[str, list[int]] = defaultdict(list)
    exact = []
    examples = []
    # Descriptions name every object: how often held-out vs seen colour+shape pairs come out right.
    naming: dict[str, list[int]] = {"seen": [], "held_out": []}
    for image, rec in iter_test_samples(urls, limit):
        question = rec["conversations"][0]["value"]
        reference = rec["conversations"][1]["value"]
        reply = answer(adapter, processor, image, question, max_new_tokens)
        ok = answer_is_correct(reply, rec["checks"][0], rec["tasks"][0], rec["scene"])
        per_task[rec["tasks"][0]].append(int(ok))
        per_kind[question_kind(rec["tasks"][0], rec["checks"][0], question)].append(int(ok))
        exact.append(int(reply == reference))
        if rec["tasks"][0] == "describe":
            for held_out, named in object_naming(reply, rec["scene"]):
                naming["held_out" if held_out else "seen"].append(int(named))
        if len(examples) < 8:
            examples.append(
                {"id": rec["id"], "question": question, "answer": reply, "reference": reference, "correct": ok}
            )
        if log and len(exact) % 64 == 0:
            log(f"evaluated {len(exact)} samples")
    total = [x for v in per_task.values() for x in v]
    return {
        "samples": len(total),
        "accuracy": sum(total) / max(1, len(total)),
        "per_task": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(per_task.items())},
        "per_kind": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(per_kind.items())},
        "exact_match": sum(exact) / max(1, len(exact)),
        "describe_objects_named": {k: {"n": len(v), "rate": sum(v) / max(1, len(v))} for k, v in naming.items()},
        "examples": examples,
    }


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate_target")
def main(cfg: DictConfig) -> None:
    """``python -m recipes.embedded_target.evaluate [split=val] [target_dir=...]``: accuracy of a built target."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from specvlm_lit.synthetic.generate import CorpusSpec, ensure_corpus

    if cfg.split not in ("train", "val", "test"):
        raise ValueError(f"split={cfg.split!r}: use test (held-out pairs), val or train")
    corpus = Path(cfg.corpus_dir)
    if not any(corpus.glob(f"{cfg.split}-*.tar")):  # first use: build the default corpus
        corpus = ensure_corpus(corpus, CorpusSpec())
    urls = sorted(str(p) for p in corpus.glob(f"{cfg.split}-*.tar"))
    model = LlavaForConditionalGeneration.from_pretrained(cfg.target_dir).eval()
    results = evaluate(
        model,
        AutoProcessor.from_pretrained(cfg.target_dir),
        urls,
        limit=cfg.limit,
        max_new_tokens=cfg.max_new_tokens,
        log=print,
    )
    print(json.dumps({"split": cfg.split, **{k: v for k, v in results.items() if k != "examples"}}, indent=2))


if __name__ == "__main__":
    main()
