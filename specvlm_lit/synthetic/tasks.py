"""Visual-instruction tasks over synthetic scenes, in the LLaVA conversation format.

Four task types, each with several phrasings for both question and answer (so sampling from a
model trained on them gives varied text):

- ``describe``: detailed description (long answers, 40+ tokens);
- ``attribute``: a short question (colour / shape / yes-no) answered with an explanation;
- ``count``: counting by shape, by colour or in total, with the counted objects listed;
- ``spatial``: which object is in a grid cell, or where one object is relative to another.

Objects in an unnamed colour (``SceneObject.colour is None``, training corpora with
``unnamed_colour_prob``) are named by their shape alone, are never asked about by colour, and never
count towards a colour.

Every answer carries ``checks``: the key facts (colour+shape names, counts, relations) a correct
answer must state. Held-out accuracy of the embedded target is measured against them.
"""

from __future__ import annotations

import random
from collections import Counter

from .scenes import CELLS, COLOURS, SHAPES, Scene, SceneObject

TASKS = ("describe", "attribute", "count", "spatial")
IMAGE_PLACEHOLDER = "<image>"
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLACES = (
    "in the top left corner",
    "at the top",
    "in the top right corner",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left corner",
    "at the bottom",
    "in the bottom right corner",
)


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _a(phrase: str) -> str:
    """Indefinite article for a phrase: "an orange cross", "a red circle"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def place(o: SceneObject) -> str:
    return PLACES[o.cell]


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b`` from their grid cells (cells are distinct by construction)."""
    vertical = "above" if a.row < b.row else "below" if a.row > b.row else ""
    horizontal = "to the left of" if a.col < b.col else "to the right of" if a.col > b.col else ""
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    return vertical or horizontal


def _unique(scene: Scene, key) -> list[SceneObject]:
    counts = Counter(key(o) for o in scene.objects)
    return [o for o in scene.objects if counts[key(o)] == 1]


def _referable(scene: Scene) -> list[SceneObject]:
    """Objects that "the <name>" picks out alone: a unique colour+shape, or a unique shape when unnamed."""
    shapes = Counter(o.shape for o in scene.objects)
    return [o for o in _unique(scene, lambda o: o.name) if o.colour or shapes[o.shape] == 1]


def _named(scene: Scene) -> list[SceneObject]:
    """Objects whose colour has a name (questions that key on colour may only ask about these)."""
    return [o for o in scene.objects if o.colour]


def describe(scene: Scene, rng: random.Random) -> tuple[str, str, list[str]]:
    q = rng.choice(
        [
            "Describe the image in detail.",
            "Give a detailed description of this picture.",
            "What do you see in this image? Describe every shape.",
            "Please describe the scene thoroughly, including colors, shapes and positions.",
            "Write a detailed description of the image.",
        ]
    )
    objs = scene.reading_order()
    n = NUMBER_WORDS[len(objs)]
    noun = "shape" if len(objs) == 1 else "shapes"
    intro = rng.choice(
        [
            f"The image shows {n} {noun} on a {scene.background} background.",
            f"This picture contains {n} {noun} against a {scene.background} background.",
            f"There {'is' if len(objs) == 1 else 'are'} {n} {noun} in this image, "
            f"drawn on a {scene.background} background.",
        ]
    )
    style = rng.randrange(3)
    sentences = [intro]
    for o in objs:
        if style == 0:
            sentences.append(f"There is {_a(o.size)} {o.name} {place(o)}.")
        elif style == 1:
            sentences.append(f"{_cap(_a(o.size))} {o.name} sits {place(o)}.")
        else:
            sentences.append(f"{_cap(place(o))}, there is {_a(o.size)} {o.name}.")
    # "The cross is above ..." would be ambiguous for an unnamed cross next to a named one.
    referable = _referable(scene)
    if len(objs) >= 2 and all(o.colour or o in referable for o in (objs[0], objs[-1])):
        a, b = objs[0], objs[-1]
        sentences.append(f"The {a.name} is {relation(a, b)} the {b.name}.")
    colours = Counter(o.colour for o in objs if o.colour)
    top, k = colours.most_common(1)[0] if colours else (None, 1)
    if k > 1:
        sentences.append(f"The most common color is {top}, used by {NUMBER_WORDS[k]} shapes.")
    else:
        sentences.append("Every shape has a different color.")
    return q, " ".join(sentences), [n] + [o.name for o in objs]


# Attribute questions about one object: (question wordings, answer wordings, the fact an answer must state).
_ATTRIBUTE_ASKS = {
    "colour": (
        lambda o: [
            f"What color is the {o.shape}?",
            f"Which color does the {o.shape} have?",
            f"Tell me the color of the {o.shape}.",
        ],
        lambda o: [
            f"The {o.shape} is {o.colour}. It is {_a(o.size)} shape {place(o)}.",
            f"It is {o.colour}. The {o.size} {o.shape} is located {place(o)}.",
        ],
        lambda o: o.colour,
    ),
    "shape": (
        lambda o: [
            f"What shape is the {o.colour} object?",
            f"Which shape is {o.colour}?",
            f"What is the {o.colour} shape?",
        ],
        lambda o: [
            f"The {o.colour} object is a {o.shape}. It is {o.size} and located {place(o)}.",
            f"It is {_a(o.size)} {o.shape}, {place(o)}.",
        ],
        lambda o: o.shape,
    ),
}


def attribute(scene: Scene, rng: random.Random) -> tuple[str, str, list[str]]:
    options = []
    by_shape = [o for o in _unique(scene, lambda o: o.shape) if o.colour]
    by_colour = [o for o in _unique(scene, lambda o: o.colour) if o.colour]
    if by_shape:
        options.append("colour")
    if by_colour:
        options.append("shape")
    options.append("exists")
    kind = rng.choice(options)
    if kind in _ATTRIBUTE_ASKS:
        questions, answers, fact = _ATTRIBUTE_ASKS[kind]
        o = rng.choice(by_shape if kind == "colour" else by_colour)
        return rng.choice(questions(o)), rng.choice(answers(o)), [fact(o)]
    # Yes/no: half the time ask about an object that is there, otherwise one that is not.
    present = {o.name for o in scene.objects}
    if rng.random() < 0.5 and _named(scene):
        o = rng.choice(_named(scene))
        colour, shape = o.colour, o.shape
    else:
        colour, shape = _absent_pair(scene, rng)
    q = rng.choice(
        [
            f"Is there {_a(colour)} {shape} in the image?",
            f"Can you see {_a(colour)} {shape}?",
            f"Does the picture contain {_a(colour)} {shape}?",
        ]
    )
    name = f"{colour} {shape}"
    if name in present:
        o = next(x for x in scene.objects if x.name == name)
        a = f"Yes, there is {_a(o.size)} {name} {place(o)}."
        return q, a, ["Yes"]
    others = _join([_a(x.name) for x in scene.reading_order()])
    a = f"No, there is no {name}. The image contains {others}."
    return q, a, ["No"] + [x.name for x in scene.objects]


def _absent_pair(scene: Scene, rng: random.Random) -> tuple[str, str]:
    # Ask about a colour or a shape that is in the scene, paired wrongly: the hard negative.
    present = {o.name for o in scene.objects}
    colours = sorted({o.colour for o in scene.objects if o.colour})
    shapes = sorted({o.shape for o in scene.objects})
    for _ in range(50):
        colour = rng.choice(colours) if colours and rng.random() < 0.5 else rng.choice(sorted(COLOURS))
        shape = rng.choice(shapes) if rng.random() < 0.5 else rng.choice(SHAPES)
        if f"{colour} {shape}" not in present:
            return colour, shape
    return next((c, s) for c in sorted(COLOURS) for s in SHAPES if f"{c} {s}" not in present)


def count(scene: Scene, rng: random.Random) -> tuple[str, str, list[str]]:
    kind = rng.choice(["shape", "colour", "total"])
    if kind == "shape":
        shape = rng.choice([o.shape for o in scene.objects] + list(SHAPES))
        hits = [o for o in scene.reading_order() if o.shape == shape]
        q = rng.choice(
            [
                f"How many {_plural(shape)} are there?",
                f"Count the {_plural(shape)} in the picture.",
                f"How many {_plural(shape)} can you see?",
            ]
        )
        what = _plural(shape) if len(hits) != 1 else shape
        listed = [f"{_a(o.colour)} one {place(o)}" if o.colour else f"one {place(o)}" for o in hits]
    elif kind == "colour":
        colour = rng.choice([o.colour for o in _named(scene)] + list(COLOURS))
        hits = [o for o in scene.reading_order() if o.colour == colour]
        q = rng.choice(
            [
                f"How many {colour} shapes are in the image?",
                f"Count the {colour} objects.",
                f"How many shapes are {colour}?",
            ]
        )
        what = f"{colour} shapes" if len(hits) != 1 else f"{colour} shape"
        listed = [f"{_a(o.shape)} {place(o)}" for o in hits]
    else:
        hits = scene.reading_order()
        q = rng.choice(
            [
                "How many shapes are there in total?",
                "Count all the shapes in the image.",
                "How many objects does the picture contain?",
            ]
        )
        what = "shapes" if len(hits) != 1 else "shape"
        listed = [_a(o.name) for o in hits]
    n = NUMBER_WORDS[len(hits)]
    if not hits:
        a = f"There are no {what} in the image."
    elif len(hits) == 1:
        a = f"There is one {what}: {listed[0]}."
    else:
        a = f"There are {n} {what}: {_join(listed)}."
    return q, a, [n]


def spatial(scene: Scene, rng: random.Random) -> tuple[str, str, list[str]]:
    names = _referable(scene)
    if len(names) >= 2 and rng.random() < 0.6:
        a_obj, b_obj = rng.sample(names, 2)
        rel = relation(a_obj, b_obj)
        q = rng.choice(
            [
                f"Where is the {a_obj.name} relative to the {b_obj.name}?",
                f"What is the position of the {a_obj.name} compared to the {b_obj.name}?",
                f"Is the {a_obj.name} left, right, above or below the {b_obj.name}?",
            ]
        )
        a = (
            f"The {a_obj.name} is {rel} the {b_obj.name}. "
            f"It is {place(a_obj)}, while the {b_obj.name} is {place(b_obj)}."
        )
        return q, a, [a_obj.name, rel, b_obj.name]
    o = rng.choice(scene.objects)
    cell = CELLS[o.cell]
    q = rng.choice(
        [
            f"Which shape is in the {cell} of the image?",
            f"What is located in the {cell}?",
            f"What do you see in the {cell} part of the picture?",
        ]
    )
    a = rng.choice([f"There is {_a(o.size)} {o.name} {place(o)}.", f"{_cap(_a(o.size))} {o.name} is {place(o)}."])
    return q, a, [o.name]


TASK_FNS = {"describe": describe, "attribute": attribute, "count": count, "spatial": spatial}


def make_turn(task: str, scene: Scene, rng: random.Random) -> dict:
    if task not in TASK_FNS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    q, a, checks = TASK_FNS[task](scene, rng)
    return {"task": task, "question": q, "answer": a, "checks": checks}


def to_llava_conversation(turns: list[dict]) -> list[dict]:
    """LLaVA format: alternating human/gpt messages, the image placeholder in the first question."""
    conv = []
    for i, t in enumerate(turns):
        q = f"{IMAGE_PLACEHOLDER}\n{t['question']}" if i == 0 else t["question"]
        conv.append({"from": "human", "value": q})
        conv.append({"from": "gpt", "value": t["answer"]})
    return conv
