"""Dense patch labels (stage 1's supervision) agree with the rendered image."""

import random

from recipes.embedded_target.patch_labels import PATCH_LABEL_CLASSES, patch_labels
from specvlm_lit.synthetic.scenes import BACKGROUNDS, COLOURS, render, repaint_unnamed, sample_scene


def test_patch_labels_match_the_rendered_pixels():
    import numpy as np

    colours, backgrounds = sorted(COLOURS), sorted(BACKGROUNDS)
    rng = random.Random(5)
    for _ in range(12):
        scene = sample_scene(rng, resolutions=(64, 96, 128))
        g = scene.resolution // 8
        labels = patch_labels(scene, patch_size=8)
        assert set(labels) == set(PATCH_LABEL_CLASSES) | {"instance", "occupancy"}
        assert all(len(labels[k]) == g * g and max(labels[k]) < n for k, n in PATCH_LABEL_CLASSES.items())
        assert max(labels["instance"]) <= len(scene.objects) and len(labels["occupancy"]) == g * g
        # Patches an object owns are mostly covered by it in the sub-patch mask, background patches mostly not.
        for inst, occ in zip(labels["instance"], labels["occupancy"]):
            assert (sum(occ) >= 3) if inst else (sum(occ) <= 8), (inst, occ)
        pix = np.asarray(render(scene)).reshape(g, 8, g, 8, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, 64, 3)
        for j in range(g * g):
            c = labels["colour"][j]
            rgb = COLOURS[colours[c - 1]] if c else BACKGROUNDS[backgrounds[labels["background"][j]]]
            share = (np.abs(pix[j].astype(int) - rgb).max(1) < 30).mean()
            # An object owns >= 25% of its patches (anti-aliased edges blur a little); background owns > 50%.
            assert share >= (0.15 if c else 0.5), (scene, j, c, share)
            assert (labels["shape"][j] > 0) == (c > 0) == (labels["cell"][j] > 0)
        # Every object whose centre is not covered by another object has exactly one centre patch.
        assert 1 <= sum(labels["centre"]) <= len(scene.objects)


def test_patch_labels_leave_unnamed_colours_unlabelled():
    scene = repaint_unnamed(sample_scene(random.Random(5), resolutions=(64,), min_objects=2), 0.999, random.Random(0))
    labels = patch_labels(scene)
    owned = [j for j, inst in enumerate(labels["instance"]) if inst]
    assert owned and all(labels["colour"][j] == -100 and labels["shape"][j] > 0 for j in owned)
