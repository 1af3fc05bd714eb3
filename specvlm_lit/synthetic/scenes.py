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
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
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
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# (colour, shape) pairs that only the test split contains.
HELD_OUT_PAIRS = frozenset(
    {
        ("red", "triangle"),
        ("blue", "circle"),
        ("green", "diamond"),
        ("yellow", "cross"),
        ("purple", "square"),
        ("orange", "circle"),
    }
)
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
        """ "red circle"; just "circle" for an object in an unnamed colour."""
        return f"{self.colour} {self.shape}" if self.colour else self.shape

    @property
    def fill(self) -> tuple[int, int, int]:
        if self.paint is not None:
            return tuple(self.paint)
        return COLOURS[self.colour]

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
    def from_dict(cls, d: dict) -> Scene:
        objects = tuple(
            SceneObject(**{**o, "paint": tuple(o["paint"]) if o.get("paint") else None}) for o in d["objects"]
        )
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
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, fills: dict[int, tuple[int, int, int]] | None = None) -> Image.Image:
    """Render a scene to an RGB PIL image of ``scene.resolution`` pixels square.

    Drawn at 2x and downsampled so edges are anti-aliased like a real photo's, not pixel-exact.
    ``fills`` paints chosen objects (by index) in other RGB colours than their named ones.
    """
    s = scene.resolution * 2
    img = Image.new("RGB", (s, s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        draw_object(draw, o, s, (fills or {}).get(i, o.fill))
    return img.resize((scene.resolution, scene.resolution), Image.BILINEAR)


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
    objects = tuple(
        replace(o, colour=None, paint=unnamed_colour(rng)) if rng.random() < p else o for o in scene.objects
    )
    return replace(scene, objects=objects)


def draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, side: int, fill) -> None:
    """Draw ``o`` on a ``side``-pixel canvas in ``fill`` (what ``render`` and instance maps share)."""
    r = SIZE_FRACTION[o.size] * side / 2
    cx, cy = o.cx * side, o.cy * side
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
