"""Deterministic synthetic scenes: coloured shapes on plain backgrounds.

A scene is a small structured record (background, image size, a list of objects with colour, shape,
size and a 3x3 grid cell) rendered with PIL. Everything is a pure function of a seeded
``random.Random`` so the corpus is reproducible bit for bit.

The test split must contain attribute combinations never seen in training, so a fixed set of
(colour, shape) pairs is *held out*: train/val scenes never contain them and every test scene
contains at least one.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
    "pink": (250, 130, 190),
}
# Train-only colour names (corpora with ``extra_colour_prob`` > 0). Each is seen with every shape, so
# the base colours' few shapes stop being the only evidence of how colour and shape combine: a table
# of seen combinations then costs the LM more than reading colour and shape separately. val/test
# (and the held-out pairs, all in base colours) never use them. Every one is >= 85 RGB from all
# other named and background colours.
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "brown": (140, 80, 30),
    "magenta": (230, 40, 230),
    "navy": (20, 30, 120),
    "maroon": (120, 0, 60),
    "teal": (0, 128, 128),
    "lime": (140, 240, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Train-only shape names (corpora with ``extra_shape_prob`` > 0), the shape-side twin of
# EXTRA_COLOURS: each is drawn in every base colour, so every base colour (and each colour of a
# held-out pair) is seen with more shapes. Outlines are chosen to be unlike the base shapes at 64 px
# (a ring or hexagon would come close to a circle); val/test never use them.
EXTRA_SHAPES = ("star", "arrow", "bar", "hourglass")
SIZES = ("small", "medium", "large")
# Object extent as a fraction of the image side: even "small" spans >= 1.5 patches at the
# lowest resolution, so every object is visible to the vision tower.
SIZE_FRACTION = {"small": 0.19, "medium": 0.26, "large": 0.33}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "beige": (225, 210, 170),
}
# 3x3 grid cells, row-major; names read naturally in sentences ("in the top left").
CELLS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# (colour, shape) pairs that only the test split contains.
HELD_OUT_PAIRS = frozenset({
    ("red", "triangle"), ("blue", "circle"), ("green", "diamond"),
    ("yellow", "cross"), ("purple", "square"), ("orange", "circle"),
})
# Visual-token counts vary with resolution: 64 / 144 / 256 tokens at patch size 8.
DEFAULT_RESOLUTIONS = (64, 96, 128)
MAX_OBJECTS = 5


@dataclass(frozen=True)
class SceneObject:
    colour: str | None  # None: painted in ``paint``, an RGB colour that names no colour
    shape: str
    size: str
    cell: int  # index into CELLS
    # Centre in image-relative coordinates (0..1); jittered inside the cell.
    cx: float
    cy: float
    paint: tuple[int, int, int] | None = None

    @property
    def name(self) -> str:
        """"red circle"; just "circle" for an object in an unnamed colour."""
        return f"{self.colour} {self.shape}" if self.colour else self.shape

    @property
    def fill(self) -> tuple[int, int, int]:
        if self.paint is not None:
            return tuple(self.paint)
        return COLOURS[self.colour] if self.colour in COLOURS else EXTRA_COLOURS[self.colour]

    @property
    def where(self) -> str:
        return CELLS[self.cell]

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3


@dataclass(frozen=True)
class Scene:
    resolution: int
    background: str
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict:
        # ``paint`` is written only where set, so corpora without unnamed colours keep their old records.
        objects = [{k: v for k, v in asdict(o).items() if k != "paint" or v is not None} for o in self.objects]
        return {"resolution": self.resolution, "background": self.background, "objects": objects}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objects = tuple(SceneObject(**{**o, "paint": tuple(o["paint"]) if o.get("paint") else None}) for o in d["objects"])
        return cls(d["resolution"], d["background"], objects)

    def reading_order(self) -> list[SceneObject]:
        """Objects sorted top-to-bottom, left-to-right: the order descriptions list them in."""
        return sorted(self.objects, key=lambda o: (o.row, o.col))


def validate_scene_args(resolutions: tuple[int, ...], max_objects: int, patch_size: int = 8) -> None:
    """Reject sizes and counts the generator cannot honour, with a message that says why."""
    if not resolutions:
        raise ValueError("resolutions must list at least one image size, e.g. [64, 96, 128]")
    for r in resolutions:
        if not isinstance(r, int) or r < 32 or r > 1024:
            raise ValueError(f"resolution {r!r} is out of range: use integers in [32, 1024]")
        if r % patch_size:
            raise ValueError(
                f"resolution {r} is not a multiple of the patch size {patch_size}; "
                f"use e.g. {r - r % patch_size or patch_size}"
            )
    if not isinstance(max_objects, int) or not 1 <= max_objects <= 9:
        raise ValueError(f"max_objects must be an integer in [1, 9] (one object per grid cell), got {max_objects!r}")


def sample_scene(
    rng: random.Random,
    *,
    resolutions: tuple[int, ...] = DEFAULT_RESOLUTIONS,
    max_objects: int = MAX_OBJECTS,
    held_out: str = "exclude",
    min_objects: int = 1,
) -> Scene:
    """Draw one scene.

    held_out: "exclude" never uses a held-out (colour, shape) pair; "require" makes sure at least
    one object is a held-out pair (the test split).
    """
    if held_out not in ("exclude", "require"):
        raise ValueError(f"held_out must be 'exclude' or 'require', got {held_out!r}")
    resolution = rng.choice(resolutions)
    background = rng.choice(sorted(BACKGROUNDS))
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(9), n)
    objects: list[SceneObject] = []
    forced = rng.randrange(n) if held_out == "require" else -1
    for i, cell in enumerate(cells):
        if i == forced:
            colour, shape = rng.choice(sorted(HELD_OUT_PAIRS))
        else:
            while True:
                colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
                if held_out == "exclude" and (colour, shape) in HELD_OUT_PAIRS:
                    continue
                break
        size = rng.choice(SIZES)
        # Jitter inside the cell; large objects may overlap neighbours a little ("some overlap").
        cx = (cell % 3 + 0.5 + rng.uniform(-0.18, 0.18)) / 3
        cy = (cell // 3 + 0.5 + rng.uniform(-0.18, 0.18)) / 3
        objects.append(SceneObject(colour, shape, size, cell, round(cx, 4), round(cy, 4)))
    return Scene(resolution, background, tuple(objects))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r / 2.6
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
            (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
            (cx - r, cy - t), (cx - t, cy - t),
        ]
    if shape == "star":  # five points, inner radius 0.45 r
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "arrow":  # pointing right: a shaft and a head
        t = r / 3
        return [(cx - r, cy - t), (cx, cy - t), (cx, cy - r), (cx + r, cy), (cx, cy + r), (cx, cy + t), (cx - r, cy + t)]
    if shape == "bar":  # a wide rectangle, 5:2
        return [(cx - r, cy - 0.4 * r), (cx + r, cy - 0.4 * r), (cx + r, cy + 0.4 * r), (cx - r, cy + 0.4 * r)]
    if shape == "hourglass":  # two triangles meeting at their tips
        return [(cx - r, cy - r), (cx + r, cy - r), (cx, cy), (cx + r, cy + r), (cx - r, cy + r), (cx, cy)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join((*SHAPES, *EXTRA_SHAPES))}")


def render(scene: Scene, fills: dict[int, tuple[int, int, int]] | None = None) -> Image.Image:
    """Render a scene to an RGB PIL image of ``scene.resolution`` pixels square.

    Drawn at 2x and downsampled so edges are anti-aliased like a real photo's, not pixel-exact.
    ``fills`` paints chosen objects (by index) in other RGB colours than their named ones.
    """
    s = scene.resolution * 2
    img = Image.new("RGB", (s, s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        _draw_object(draw, o, s, (fills or {}).get(i, o.fill))
    return img.resize((scene.resolution, scene.resolution), Image.BILINEAR)


# Dense per-patch labels for vision pre-training (see specvlm_lit/embedded/vision_pretrain.py).
# Index 0 is always "no object here"; object attributes are shifted by one.
PATCH_LABEL_CLASSES = {
    "colour": 1 + len(COLOURS),
    "shape": 1 + len(SHAPES),
    "size": 1 + len(SIZES),
    "cell": 1 + len(CELLS),
    "centre": 2,  # the patch holds the centre of a visible object (what counting needs)
    "background": len(BACKGROUNDS),
}


OCCUPANCY_GRID = 4


def unnamed_colour(rng: random.Random, min_distance: float = 90.0) -> tuple[int, int, int]:
    """A random RGB colour far from every named colour and background: it names no colour at all."""
    named = list(COLOURS.values()) + list(BACKGROUNDS.values())
    while True:
        c = tuple(rng.randrange(256) for _ in range(3))
        if min(math.dist(c, n) for n in named) >= min_distance:
            return c


def repaint_unnamed(scene: Scene, p: float, rng: random.Random) -> Scene:
    """Each object, with probability ``p``, repainted in an ``unnamed_colour`` (its colour becomes None).

    Its shape stays, so no held-out colour+shape pair can appear: the object simply has no colour name.
    """
    objects = tuple(replace(o, colour=None, paint=unnamed_colour(rng)) if rng.random() < p else o for o in scene.objects)
    return replace(scene, objects=objects)


def repaint_extra(scene: Scene, p: float, rng: random.Random) -> Scene:
    """Each object, with probability ``p``, repainted in one of the train-only ``EXTRA_COLOURS``.

    Its shape stays and every extra colour goes with every shape, so no held-out pair can appear.
    Objects already in an unnamed colour keep it, so ``unnamed_colour_prob`` keeps its meaning.
    """
    names = sorted(EXTRA_COLOURS)
    objects = tuple(replace(o, colour=rng.choice(names)) if o.colour is not None and rng.random() < p else o
                    for o in scene.objects)
    return replace(scene, objects=objects)


def reshape_extra(scene: Scene, p: float, rng: random.Random) -> Scene:
    """Each object, with probability ``p``, redrawn as one of the train-only ``EXTRA_SHAPES``.

    Its colour stays and held-out pairs are all base shapes, so no held-out pair can appear.
    """
    objects = tuple(replace(o, shape=rng.choice(EXTRA_SHAPES)) if rng.random() < p else o for o in scene.objects)
    return replace(scene, objects=objects)


def _draw_object(draw: "ImageDraw.ImageDraw", o: SceneObject, side: int, fill) -> None:
    r = SIZE_FRACTION[o.size] * side / 2
    cx, cy = o.cx * side, o.cy * side
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)


def patch_labels(scene: Scene, patch_size: int = 8, min_cover: float = 0.25) -> dict[str, list[int]]:
    """What each patch of the rendered image shows, row-major over the (res/patch)^2 grid.

    One list per ``PATCH_LABEL_CLASSES`` key, plus ``instance`` (which object owns the patch) and
    ``occupancy`` (a sub-patch foreground mask per patch).

    The scene is re-drawn as an instance map (object i+1 painted in drawing order, so the top-most
    object wins where shapes overlap, as in ``render``). A patch belongs to the object covering most
    of it when that object covers at least ``min_cover`` of the patch, else to the background.
    """
    import numpy as np

    scale = 2  # same supersampling as render(), so edges match the anti-aliased image
    side = scene.resolution * scale
    inst = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(inst)
    for i, o in enumerate(scene.objects):
        _draw_object(draw, o, side, i + 1)
    g, p = scene.resolution // patch_size, patch_size * scale
    blocks = np.asarray(inst).reshape(g, p, g, p).transpose(0, 2, 1, 3).reshape(g * g, p * p)
    # owner[j]: index of the object that owns patch j, or -1 for background.
    counts = np.stack([(blocks == i + 1).sum(1) for i in range(len(scene.objects))] + [np.zeros(g * g, int)], 1)
    owner = np.where(counts.max(1) >= min_cover * p * p, counts.argmax(1), -1)
    colours, shapes, backgrounds = sorted(COLOURS), list(SHAPES), sorted(BACKGROUNDS)
    # occupancy[j]: which of the patch's OCCUPANCY_GRID^2 sub-cells an object covers (row-major bits):
    # a colour-independent, purely local view of the outline, from which shape can be assembled.
    sub = p // OCCUPANCY_GRID
    cells = (blocks.reshape(g * g, OCCUPANCY_GRID, sub, OCCUPANCY_GRID, sub) > 0).mean((2, 4)) >= 0.5
    labels = {k: [0] * (g * g) for k in PATCH_LABEL_CLASSES}
    labels["occupancy"] = cells.reshape(g * g, -1).astype(int).tolist()
    labels["instance"] = [i + 1 for i in owner.tolist()]  # 0 = background, i + 1 = scene.objects[i]
    labels["background"] = [backgrounds.index(scene.background)] * (g * g)
    for j, i in enumerate(owner.tolist()):
        if i < 0:
            continue
        o = scene.objects[i]
        # Unnamed and train-only extra colours (and shapes) have no class of their own: no label.
        labels["colour"][j] = 1 + colours.index(o.colour) if o.colour in COLOURS else -100
        labels["shape"][j] = 1 + shapes.index(o.shape) if o.shape in SHAPES else -100  # train-only shapes too
        labels["size"][j] = 1 + SIZES.index(o.size)
        labels["cell"][j] = 1 + o.cell
    for i, o in enumerate(scene.objects):
        j = min(int(o.cy * g), g - 1) * g + min(int(o.cx * g), g - 1)
        if owner[j] == i:  # only a visible centre counts: a hidden object cannot be counted
            labels["centre"][j] = 1
    return labels
