"""Write the synthetic visual-instruction corpus as webdataset tar shards.

Layout of ``out_dir``::

    train-000000.tar ...   one sample = ``<key>.png`` + ``<key>.json``
    val-000000.tar ...
    test-000000.tar ...    scenes with held-out (colour, shape) pairs only
    manifest.json          sizes, seed, resolutions: the corpus is a pure function of these

The ``.json`` member holds the LLaVA-style record ``{"id", "image", "conversations", "tasks",
"checks", "scene"}`` so the same loader reads these shards and real LLaVA shards.
Shards are written to a temporary directory and moved into place only when complete, so an
interrupted run never leaves a corpus that looks finished.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import webdataset as wds

from ..errors import UserError, one_line
from ..utils.atomic import atomic_directory
from .scenes import DEFAULT_RESOLUTIONS, MAX_OBJECTS, render, repaint_unnamed, sample_scene, validate_scene_args
from .tasks import TASKS, make_turn, to_llava_conversation

MANIFEST = "manifest.json"
CORPUS_VERSION = 1  # bump when scenes or tasks change: cached corpora are then rebuilt


@dataclass
class CorpusSpec:
    n_train: int = 24000
    n_val: int = 256
    n_test: int = 256
    seed: int = 0
    resolutions: tuple[int, ...] = DEFAULT_RESOLUTIONS
    max_objects: int = MAX_OBJECTS
    samples_per_shard: int = 2000
    # Training conversations get 1..max_turns turns (more supervision per encoded image);
    # val/test are single-turn so each prompt is one question about a fresh image.
    max_turns: int = 3
    # Share of train-split objects repainted in a random colour that names none and named by shape
    # alone ("a small cross"): the model must then read shape from the outline, not from the colour,
    # which is what held-out colour+shape pairs need. val/test never get them.
    unnamed_colour_prob: float = 0.0
    # Train-split task mix: None draws 1..max_turns distinct tasks evenly (the default corpus). A
    # {task: weight} dict draws each turn's task by weight, repeats allowed (never the same question
    # twice), so look-up questions can get more of the steps than long descriptions.
    task_weights: dict[str, float] | None = None
    version: int = field(default=CORPUS_VERSION)

    def validate(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.n_train + self.n_val + self.n_test == 0:
            raise ValueError("the corpus would be empty: set n_train, n_val or n_test above 0")
        if not isinstance(self.samples_per_shard, int) or self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be a positive integer, got {self.samples_per_shard!r}")
        if not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise ValueError(f"max_turns must be a positive integer, got {self.max_turns!r}")
        if self.task_weights is None:
            if self.max_turns > len(TASKS):
                raise ValueError(
                    f"max_turns={self.max_turns} needs repeated tasks: at most {len(TASKS)} distinct "
                    "tasks exist; set task_weights to allow repeats or lower max_turns"
                )
        else:
            unknown = set(self.task_weights) - set(TASKS)
            weights = list(self.task_weights.values())
            if unknown or not all(isinstance(w, (int, float)) and w >= 0 for w in weights) or not sum(weights) > 0:
                raise ValueError(
                    f"task_weights={self.task_weights!r}: give non-negative weights, not all zero, "
                    f"for tasks among {', '.join(TASKS)}"
                )
        if not 0.0 <= self.unnamed_colour_prob < 1.0:
            raise ValueError(
                f"unnamed_colour_prob must be in [0, 1) (some objects must keep the named colours "
                f"that val/test use), got {self.unnamed_colour_prob!r}"
            )
        validate_scene_args(tuple(self.resolutions), self.max_objects)


def make_sample(spec: CorpusSpec, split: str, index: int) -> dict:
    """One sample, a pure function of (seed, split, index)."""
    rng = random.Random(f"{spec.seed}/{split}/{index}")
    n_turns = rng.randint(1, spec.max_turns) if split == "train" else 1
    if split == "train" and spec.task_weights is not None:
        tasks = rng.choices(TASKS, weights=[spec.task_weights.get(t, 0.0) for t in TASKS], k=n_turns)
    else:
        tasks = rng.sample(TASKS, n_turns)
    scene = sample_scene(
        rng,
        resolutions=tuple(spec.resolutions),
        max_objects=spec.max_objects,
        held_out="require" if split == "test" else "exclude",
        # Detailed descriptions need two or more objects to reach 40+ tokens.
        min_objects=2 if "describe" in tasks and spec.max_objects >= 2 else 1,
    )
    if split == "train" and spec.unnamed_colour_prob > 0:
        # Its own random stream: the scene draw and the questions stay those of the default corpus.
        scene = repaint_unnamed(scene, spec.unnamed_colour_prob, random.Random(f"{spec.seed}/{split}/{index}/unnamed"))
    turns = []
    for t in tasks:
        # A repeated task asks something new; small scenes have few questions, so give up after 10 draws.
        asked = {u["question"] for u in turns}
        turns_of_t = (make_turn(t, scene, rng) for _ in range(10))
        turn = next((x for x in turns_of_t if x["question"] not in asked), None)
        if turn is not None:
            turns.append(turn)
    key = f"{split}-{index:07d}"
    buf = io.BytesIO()
    render(scene).save(buf, format="PNG", optimize=False)
    record = {
        "id": key,
        "image": f"{key}.png",
        "conversations": to_llava_conversation(turns),
        "tasks": [t["task"] for t in turns],
        "checks": [t["checks"] for t in turns],
        "scene": scene.to_dict(),
    }
    return {"__key__": key, "png": buf.getvalue(), "json": record}


def generate_corpus(out_dir: str | os.PathLike, spec: CorpusSpec | None = None, *, log=print) -> Path:
    """Generate the corpus into ``out_dir`` atomically and return the directory."""
    spec = spec or CorpusSpec()
    spec.validate()
    out = Path(out_dir)
    t0 = time.perf_counter()
    counts = {}
    # A corpus written before directories carried the publisher's marker is recognised by its manifest.
    with atomic_directory(out, "corpus", published_before=lambda d: (d / MANIFEST).is_file()) as tmp:
        for split, n in (("train", spec.n_train), ("val", spec.n_val), ("test", spec.n_test)):
            if n == 0:
                continue
            pattern = str(tmp / f"{split}-%06d.tar")
            with wds.ShardWriter(pattern, maxcount=spec.samples_per_shard, verbose=0) as sink:
                for i in range(n):
                    sink.write(make_sample(spec, split, i))
            counts[split] = n
        seconds = time.perf_counter() - t0
        manifest = {"spec": asdict(spec), "counts": counts, "generation_seconds": round(seconds, 2)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log(f"wrote {sum(counts.values())} samples ({counts}) to {out} in {seconds:.1f}s")
    return out


def corpus_is_current(out_dir: str | os.PathLike, spec: CorpusSpec) -> bool:
    """True when ``out_dir`` holds a complete corpus generated from exactly ``spec``."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return False
    try:
        written = json.loads(path.read_text())["spec"]
    except (ValueError, KeyError):
        return False
    # A field added to CorpusSpec after the corpus was written is absent from its manifest; the
    # corpus was generated as if it had its default, so an unchanged default does not force a rebuild.
    defaults = json.loads(json.dumps(asdict(CorpusSpec())))
    # A field since removed from CorpusSpec was an option that is off at a falsy value (0, false, null):
    # a corpus written with it off is today's corpus, one written with it on is not.
    if any(value for key, value in written.items() if key not in defaults):
        return False
    written = {k: v for k, v in written.items() if k in defaults}
    return {**defaults, **written} == json.loads(json.dumps(asdict(spec)))


def ensure_corpus(out_dir: str | os.PathLike, spec: CorpusSpec | None = None, *, log=print) -> Path:
    """Generate the corpus unless an identical one is already there (first-use build)."""
    spec = spec or CorpusSpec()
    if corpus_is_current(out_dir, spec):
        return Path(out_dir)
    return generate_corpus(out_dir, spec, log=log)


def _task_weights(text: str) -> dict[str, float]:
    """``describe=1,attribute=3`` -> {"describe": 1.0, "attribute": 3.0} (the --task-weights syntax)."""
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write task=weight pairs, e.g. describe=1,attribute=3") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate the synthetic visual-instruction corpus (webdataset shards).")
    p.add_argument("--out", default="data/synthetic", help="output directory (replaced atomically)")
    # One flag per CorpusSpec field (--n-train, --unnamed-colour-prob, ...), so a new option needs no code here.
    for f in fields(CorpusSpec):
        if f.name == "version":
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, tuple):
            p.add_argument(flag, type=int, nargs="+", default=list(default))
        elif "dict" in str(f.type):
            p.add_argument(flag, type=_task_weights, default=default, help="e.g. describe=1,attribute=3")
        else:
            p.add_argument(flag, type=type(default), default=default)
    a = vars(p.parse_args(argv))
    out = a.pop("out")
    spec = CorpusSpec(**{**a, "resolutions": tuple(a["resolutions"])})
    try:
        generate_corpus(out, spec)
    except UserError as e:  # e.g. --out names a directory this project did not write: one line, nothing touched
        raise SystemExit(f"error: {one_line(e)}") from None
    except ValueError as e:  # a flag value CorpusSpec.validate rejects: argparse's usage + error
        p.error(str(e))


if __name__ == "__main__":
    main()
