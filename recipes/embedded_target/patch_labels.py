"""Dense per-patch labels of a synthetic scene: the exact supervision of vision pre-training (stage 1).

What each patch of the rendered image shows (the object's colour, shape, size, grid cell, whether its centre
is there, the background), read off an instance map drawn exactly like the image.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from specvlm_lit.synthetic.scenes import BACKGROUNDS, CELLS, COLOURS, SHAPES, SIZES, Scene, draw_object

# Index 0 is always "no object here"; object attributes are shifted by one.
PATCH_LABEL_CLASSES = {
    "colour": 1 + len(COLOURS),
    "shape": 1 + len(SHAPES),
    "size": 1 + len(SIZES),
    "cell": 1 + len(CELLS),
    "centre": 2,  # the patch holds the centre of a visible object (what counting needs)
    "background": len(BACKGROUNDS),
}
# Side of the sub-patch foreground mask (``occupancy``): OCCUPANCY_GRID^2 cells per patch.
OCCUPANCY_GRID = 4


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
        draw_object(draw, o, side, i + 1)
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
        # An unnamed colour has no class of its own: no colour label.
        labels["colour"][j] = 1 + colours.index(o.colour) if o.colour in COLOURS else -100
        labels["shape"][j] = 1 + shapes.index(o.shape)
        labels["size"][j] = 1 + SIZES.index(o.size)
        labels["cell"][j] = 1 + o.cell
    for i, o in enumerate(scene.objects):
        j = min(int(o.cy * g), g - 1) * g + min(int(o.cx * g), g - 1)
        if owner[j] == i:  # only a visible centre counts: a hidden object cannot be counted
            labels["centre"][j] = 1
    return labels
