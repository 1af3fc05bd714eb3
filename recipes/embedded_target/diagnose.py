"""Where a target's held-out-pair errors come from: the image features or the language model.

Two measurements, each reported per held-out (colour, shape) pair:

- ``shape_probe``: a linear classifier of object shape on features averaged over each object's
  patches, fitted on seen-pair objects and scored on held-out-pair objects, once on the vision
  tower's output and once on the projector's (what the language model reads). High accuracy means
  the shape is in those features in a form that does not depend on the colour.
- ``colour_word_probe``: the teacher-forced probability of the right shape word after the colour word
  of a held-out pair in the test descriptions, with the true colour word and with the colour word
  swapped for one that was seen with that shape. Equal figures mean the language model does not read
  the shape off the colour word; low figures on both mean it reads the shape through the colour it
  sees in the image. The same pass also scores the colour slot: the probability of the right colour
  word where the reference writes it, and the word the model would write instead when it is wrong
  (a model can keep the shape right and name a colour that was seen with that shape instead).

``python -m recipes.embedded_target.diagnose [target_dir=...]`` (conf/diagnose_target.yaml) prints both
and writes ``diagnosis.json`` to the run directory. LLaVA-architecture targets only (the embedded one).
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from specvlm_lit.data.conversation import encode_conversation
from specvlm_lit.synthetic.samples import iter_test_samples
from specvlm_lit.synthetic.scenes import COLOURS, HELD_OUT_PAIRS, SHAPES, render, sample_scene
from specvlm_lit.target import TargetAdapter

from . import CONF_DIR
from .patch_labels import patch_labels
from .recipe import attribute_word_groups


def fit_linear_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    n_classes: int,
    *,
    steps: int = 400,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
):
    """A standardised multinomial logistic regression; returns ``predict(x) -> class ids`` and train accuracy."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    weight = (torch.randn(x_train.shape[1], n_classes, generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    x = (x_train - mean) / std
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(x @ weight + bias, y_train).backward()
        opt.step()

    def predict(features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (((features - mean) / std) @ weight + bias).argmax(1)

    return predict, (predict(x_train) == y_train).float().mean().item()


@torch.no_grad()
def _tower_and_projector(adapter: TargetAdapter, image_processor, scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch features [B, n, d] of the vision tower (the projector's input) and of the projector.

    The images go through ``TargetAdapter.encode_images``, the path training and decoding use; a hook
    on the projector keeps its input, so the tower layer and CLS handling are the target's own.
    """
    pixels = image_processor(images=[render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    tower: list[torch.Tensor] = []
    hook = adapter.model.model.multi_modal_projector.register_forward_hook(lambda _m, args, _out: tower.append(args[0]))
    try:
        projected = adapter.encode_images(pixels)
    finally:
        hook.remove()
    return torch.cat(tower).float(), torch.stack(projected).float()


def _object_features(model, image_processor, held_out: str, n_scenes: int, seed: int, batch: int = 16):
    """Features pooled over each visible object's patches, with its shape and (colour, shape) pair."""
    rng = random.Random(seed)
    adapter = TargetAdapter(model)
    patch = model.config.vision_config.patch_size
    feats: dict[str, list[torch.Tensor]] = {"tower": [], "projector": []}
    shapes, pairs = [], []
    resolutions = (64, 96, 128)
    for b in range(max(1, n_scenes // batch)):
        res = resolutions[b % len(resolutions)]
        scenes = [sample_scene(rng, resolutions=(res,), held_out=held_out) for _ in range(batch)]
        tower, projector = _tower_and_projector(adapter, image_processor, scenes)
        for i, scene in enumerate(scenes):
            owner = torch.tensor(patch_labels(scene, patch)["instance"])
            for k, o in enumerate(scene.objects):
                mask = owner == k + 1
                if not mask.any() or (held_out == "require" and (o.colour, o.shape) not in HELD_OUT_PAIRS):
                    continue
                feats["tower"].append(tower[i][mask].mean(0))
                feats["projector"].append(projector[i][mask].mean(0))
                shapes.append(SHAPES.index(o.shape))
                pairs.append((o.colour, o.shape))
    return {k: torch.stack(v) for k, v in feats.items()}, torch.tensor(shapes), pairs


def shape_probe(model, processor, *, train_scenes: int = 1500, test_scenes: int = 900, seed: int = 0) -> dict:
    """Linear shape probes fitted on seen pairs, scored per held-out pair (see the module docstring)."""
    x_train, y_train, _ = _object_features(model, processor.image_processor, "exclude", train_scenes, seed)
    x_test, y_test, pairs = _object_features(model, processor.image_processor, "require", test_scenes, seed + 1)
    report = {}
    for where in ("tower", "projector"):
        predict, train_acc = fit_linear_probe(x_train[where], y_train, len(SHAPES), seed=seed)
        predicted = predict(x_test[where])
        per_pair: dict[str, Counter] = defaultdict(Counter)
        for p, pair in zip(predicted.tolist(), pairs):
            per_pair[" ".join(pair)][SHAPES[p]] += 1
        report[where] = {
            "train_accuracy": train_acc,
            "heldout_accuracy": (predicted == y_test).float().mean().item(),
            "per_pair": {
                name: {"n": sum(c.values()), "accuracy": c[name.split()[1]] / sum(c.values()), "predicted": dict(c)}
                for name, c in sorted(per_pair.items())
            },
        }
    return report


@torch.no_grad()
def colour_word_probe(model, processor, urls, *, limit: int | None = None, seed: int = 0) -> dict:
    """Teacher-forced p(right shape) after held-out pairs' colour words (true vs swapped colour word), and
    p(right colour word) at the colour slot with the model's own choice there when it is another word."""
    tok = processor.tokenizer
    adapter = TargetAdapter(model)
    colour_tokens, shape_tokens = attribute_word_groups(
        tok,
        {"colour": list(COLOURS), "shape": list(SHAPES)},
        user="colour_word_probe",
        fix="the probe reads one token per colour and shape word: use a target built on the synthetic corpus",
    )
    colour_ids, shape_ids = dict(zip(colour_tokens, COLOURS)), dict(zip(shape_tokens, SHAPES))
    shape_token = {s: t for t, s in shape_ids.items()}
    rng = random.Random(seed)
    probs: dict[str, list[float]] = {"seen_pairs": [], "true_word": [], "swapped_word": []}
    per_pair: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"true_word": [], "swapped_word": []})
    colour_slot: dict[str, list[float]] = {"seen_pairs": [], "held_out": []}
    colour_slot_pairs: dict[str, list[float]] = defaultdict(list)
    colour_slot_choice: dict[str, Counter] = defaultdict(Counter)  # held-out pair -> the word written instead
    for image, rec in iter_test_samples(urls, limit):
        if rec["tasks"][0] != "describe":
            continue
        pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        feats = adapter.encode_images(pixels)
        ids = encode_conversation(rec["conversations"], tok, feats[0].shape[0]).input_ids
        # (position of the colour word, shape) for every "<colour> <shape>" in the reference answer
        found = [
            (i, colour_ids[a], shape_ids[b])
            for i, (a, b) in enumerate(zip(ids[:-1].tolist(), ids[1:].tolist()))
            if a in colour_ids and b in shape_ids
        ]
        held = [(i, c, s) for i, c, s in found if (c, s) in HELD_OUT_PAIRS]
        variants = {"true_word": ids}
        if held:
            swapped = ids.clone()
            for i, c, s in held:
                other = rng.choice([x for x in COLOURS if x != c and (x, s) not in HELD_OUT_PAIRS])
                swapped[i] = next(t for t, name in colour_ids.items() if name == other)
            variants["swapped_word"] = swapped
        for variant, x in variants.items():
            logits = model(
                input_ids=x.unsqueeze(0),
                attention_mask=torch.ones_like(x).unsqueeze(0),
                mm_encoder_outputs=adapter.as_mm_encoder_outputs(feats),
            ).logits[0]
            p = logits.float().softmax(-1)
            for i, c, s in found:
                value = p[i, shape_token[s]].item()  # logits at the colour word predict the next token, the shape
                if (c, s) in HELD_OUT_PAIRS:
                    probs[variant].append(value)
                    per_pair[f"{c} {s}"][variant].append(value)
                elif variant == "true_word":
                    probs["seen_pairs"].append(value)
                if variant == "true_word":
                    # logits one step earlier predict the colour word itself
                    held_out = (c, s) in HELD_OUT_PAIRS
                    p_colour = p[i - 1, x[i]].item()
                    colour_slot["held_out" if held_out else "seen_pairs"].append(p_colour)
                    if held_out:
                        colour_slot_pairs[f"{c} {s}"].append(p_colour)
                        choice = int(p[i - 1].argmax())
                        if choice != int(x[i]):
                            colour_slot_choice[f"{c} {s}"][
                                tok.decode([choice]).strip() or repr(tok.decode([choice]))
                            ] += 1

    def summary(values: list[float]) -> dict:
        return {
            "n": len(values),
            "mean_p": sum(values) / max(1, len(values)),
            "share_above_half": sum(v > 0.5 for v in values) / max(1, len(values)),
        }

    return {
        **{k: summary(v) for k, v in probs.items()},
        "per_pair": {name: {k: summary(v) for k, v in d.items()} for name, d in sorted(per_pair.items())},
        "colour_slot": {
            **{k: summary(v) for k, v in colour_slot.items()},
            "per_pair": {
                name: {**summary(v), "written_instead": dict(colour_slot_choice[name])}
                for name, v in sorted(colour_slot_pairs.items())
            },
        },
    }


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="diagnose_target")
def main(cfg: DictConfig) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from specvlm_lit.synthetic.generate import CorpusSpec, ensure_corpus

    torch.manual_seed(cfg.seed)
    corpus = Path(cfg.corpus_dir)
    if not any(corpus.glob("test-*.tar")):  # first use: build the default corpus
        corpus = ensure_corpus(corpus, CorpusSpec())
    model = LlavaForConditionalGeneration.from_pretrained(cfg.target_dir).eval()
    processor = AutoProcessor.from_pretrained(cfg.target_dir)
    report = {
        "target_dir": str(cfg.target_dir),
        "shape_probe": shape_probe(
            model,
            processor,
            train_scenes=cfg.shape_probe.train_scenes,
            test_scenes=cfg.shape_probe.test_scenes,
            seed=cfg.seed,
        ),
        "colour_word_probe": colour_word_probe(
            model,
            processor,
            sorted(str(p) for p in corpus.glob("test-*.tar")),
            limit=cfg.colour_word_probe.limit,
            seed=cfg.seed,
        ),
    }
    out = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir) / "diagnosis.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
