"""Stage 1 of the embedded-target recipe: pre-train the CLIP vision tower on dense patch labels.

LLaVA starts from a CLIP tower that already sees; a tower trained from scratch only through the
language loss stays ungrounded within a CPU budget (v1 of the embedded target: 10.5% held-out
accuracy). The synthetic scenes give exact supervision for free: for every patch, the colour,
shape, size and grid cell of the object covering it, whether an object's centre lies in it, and
the background colour (``patch_labels.patch_labels``). Linear heads on the tower's last hidden states
(the features LLaVA's projector reads) learn these, so the features become grounded and
factorised by attribute, which is what lets the VLM name colour+shape pairs it never saw together.

Scenes are drawn on the fly from the same generator as the corpus, with the held-out pairs
excluded; validation uses scenes that contain held-out pairs, so its accuracy measures exactly the
compositional generalisation the test split asks for.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info
from transformers import CLIPVisionConfig, CLIPVisionModel

from specvlm_lit.synthetic.scenes import MAX_OBJECTS, SHAPES, SIZES, render, sample_scene, unnamed_colour
from specvlm_lit.utils.atomic import atomic_directory

from . import CONF_DIR
from .patch_labels import OCCUPANCY_GRID, PATCH_LABEL_CLASSES, patch_labels
from .recipe import check_same_shape, warmup_cosine

OBJECT_LABEL_CLASSES = {"object_shape": len(SHAPES), "object_size": len(SIZES)}


class ScenePatchBatches(IterableDataset):
    """Endless (or ``limit``-long) batches of rendered scenes with per-patch labels, one resolution per batch."""

    def __init__(
        self,
        image_processor,
        *,
        batch_size: int,
        resolutions: tuple[int, ...],
        patch_size: int,
        seed: int,
        held_out: str = "exclude",
        limit: int | None = None,
        unnamed_colour_prob: float = 0.0,
    ):
        self.image_processor, self.batch_size, self.resolutions = image_processor, batch_size, tuple(resolutions)
        self.patch_size, self.seed, self.held_out, self.limit = patch_size, seed, held_out, limit
        self.unnamed_colour_prob = unnamed_colour_prob

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(self.seed * 1000 + worker)
        i = 0
        while self.limit is None or i < self.limit:
            res = self.resolutions[i % len(self.resolutions)] if self.limit else rng.choice(self.resolutions)
            scenes = [sample_scene(rng, resolutions=(res,), held_out=self.held_out) for _ in range(self.batch_size)]
            # Objects repainted in an unnamed colour carry no colour label: their shape can only be told
            # from the outline. Without them the tower predicts shape from colour (the training pairs'
            # statistics), which is exactly wrong on the held-out pairs.
            fills = [
                {i: unnamed_colour(rng) for i in range(len(s.objects)) if rng.random() < self.unnamed_colour_prob}
                for s in scenes
            ]
            pixels = self.image_processor(images=[render(s, f) for s, f in zip(scenes, fills)], return_tensors="pt")[
                "pixel_values"
            ]
            labels = [patch_labels(s, self.patch_size) for s in scenes]
            for lab, f in zip(labels, fills):
                lab["colour"] = [-100 if inst - 1 in f else c for c, inst in zip(lab["colour"], lab["instance"])]
            objects = {k: torch.full((len(scenes), MAX_OBJECTS), -100) for k in OBJECT_LABEL_CLASSES}
            for b, sc in enumerate(scenes):
                for i, o in enumerate(sc.objects):
                    objects["object_shape"][b, i] = SHAPES.index(o.shape)
                    objects["object_size"][b, i] = SIZES.index(o.size)
            yield {
                "pixel_values": pixels,
                **objects,
                **{
                    k: torch.tensor([lab[k] for lab in labels]) for k in (*PATCH_LABEL_CLASSES, "instance", "occupancy")
                },
            }
            i += 1


class VisionPretraining(L.LightningModule):
    def __init__(
        self,
        vision: dict,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 30,
        min_lr_ratio: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tower = CLIPVisionModel(CLIPVisionConfig(**vision))
        hidden = self.tower.config.hidden_size
        self.heads = nn.ModuleDict(
            {k: nn.Linear(hidden, n) for k, n in {**PATCH_LABEL_CLASSES, **OBJECT_LABEL_CLASSES}.items()}
        )
        self.heads["occupancy"] = nn.Linear(hidden, OCCUPANCY_GRID**2)

    def _losses(self, batch: dict) -> tuple[torch.Tensor, dict]:
        # last_hidden_state is the last layer's output before post_layernorm: exactly what LLaVA
        # selects with vision_feature_layer=-1 (CLS dropped by the "default" strategy).
        h = self.tower(pixel_values=batch["pixel_values"], interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        total, acc = 0.0, {}
        for k in PATCH_LABEL_CLASSES:
            logits = self.heads[k](h)
            total = total + F.cross_entropy(logits.flatten(0, 1), batch[k].flatten(), ignore_index=-100)
            pred = logits.argmax(-1)
            # Accuracy on object patches only for object attributes: background dominates the grid.
            mask = (
                batch["instance"] > 0
                if k in ("colour", "shape", "size", "cell")
                else torch.ones_like(pred, dtype=torch.bool)
            )
            mask = mask & (batch[k] >= 0)
            acc[k] = (pred == batch[k])[mask].float().mean()
        # Sub-patch foreground mask: local, colour-independent geometry (edges, corners, curvature).
        occ = self.heads["occupancy"](h)
        total = total + F.binary_cross_entropy_with_logits(occ, batch["occupancy"].float()) * OCCUPANCY_GRID
        edge = (batch["occupancy"].sum(-1) % OCCUPANCY_GRID**2) > 0  # patches the outline crosses
        acc["occupancy_edge"] = ((occ > 0) == batch["occupancy"].bool()).all(-1)[edge].float().mean()
        # Object-level labels on features mean-pooled over each object's patches: the read-out an
        # attention head of the language model performs. Shape is a property of the whole outline,
        # which no single interior patch shows; pooling lets edge patches carry it.
        owner = F.one_hot(batch["instance"], MAX_OBJECTS + 1)[..., 1:].float()  # (B, P, objects)
        pooled = owner.transpose(1, 2) @ h / owner.sum(1).clamp(min=1).unsqueeze(-1)
        visible = owner.sum(1) > 0
        for k in OBJECT_LABEL_CLASSES:
            gold = batch[k].masked_fill(~visible, -100)
            logits = self.heads[k](pooled)
            total = total + F.cross_entropy(logits.flatten(0, 1), gold.flatten(), ignore_index=-100)
            acc[k] = (logits.argmax(-1) == gold)[gold >= 0].float().mean()
        return total, acc

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, acc = self._losses(batch)
        self.log("vision/loss", loss, prog_bar=True, batch_size=batch["colour"].shape[0])
        self.log_dict({f"vision/acc_{k}": v for k, v in acc.items()}, batch_size=batch["colour"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, acc = self._losses(batch)
        n = batch["colour"].shape[0]
        self.log("vision_val/loss", loss, batch_size=n)
        self.log_dict({f"vision_val/acc_{k}": v for k, v in acc.items()}, prog_bar=True, batch_size=n)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=(0.9, 0.98))
        return {
            "optimizer": opt,
            "lr_scheduler": warmup_cosine(opt, hp.warmup_steps, max(self.trainer.max_steps, 1), hp.min_lr_ratio),
        }


def pretrain_vision(
    vision: dict,
    image_processor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    val_every: int,
    val_batches: int,
    resolutions,
    seed: int,
    log_dir: str,
    unnamed_colour_prob: float = 0.0,
) -> tuple[dict, dict]:
    """Run stage 1 and return the tower's state dict (CLIPVisionModel keys) and its final metrics."""
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    module = VisionPretraining(vision, lr=lr, warmup_steps=warmup_steps)
    patch = vision["patch_size"]
    train = ScenePatchBatches(
        image_processor,
        batch_size=batch_size,
        resolutions=resolutions,
        patch_size=patch,
        seed=seed,
        unnamed_colour_prob=unnamed_colour_prob,
    )
    # Validation scenes all contain held-out colour+shape pairs (never drawn in training).
    val = ScenePatchBatches(
        image_processor,
        batch_size=64,
        resolutions=resolutions,
        patch_size=patch,
        seed=seed + 7919,
        held_out="require",
        limit=val_batches,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        val_check_interval=min(val_every, steps),
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        log_every_n_steps=10,
        logger=CSVLogger(log_dir, name="vision"),
    )
    trainer.fit(module, DataLoader(train, batch_size=None, num_workers=1), DataLoader(val, batch_size=None))
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("vision_val/")}
    return module.tower.state_dict(), metrics


TOWER_SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)


def check_tower_shape(theirs: CLIPVisionConfig, ours: CLIPVisionConfig, option: str, source) -> None:
    """Raise a clear error when a tower loaded from ``source`` does not fit the recipe's ``model.vision``."""
    check_same_shape(theirs, ours, TOWER_SHAPE_KEYS, f"{option}: the tower at {source}", "model.vision")


def save_tower(state: dict, vision: dict, out_dir, report: dict) -> None:
    """Save stage 1's tower as a ``CLIPVisionModel`` directory (+ its report), all or nothing."""
    tower = CLIPVisionModel(CLIPVisionConfig(**vision))
    tower.load_state_dict(state)
    with atomic_directory(out_dir, "tower", published_before=lambda d: (d / "stage1_report.json").is_file()) as tmp:
        tower.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "stage1_report.json").write_text(json.dumps(report, indent=2))


def load_tower(path, vision_config: CLIPVisionConfig) -> tuple[dict, dict]:
    """A tower saved by :func:`save_tower`, checked to fit ``vision_config``: (state dict, stage-1 report)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"vision_pretrain.from_tower: no saved tower at {path} (config.json missing); "
            "run stage 1 first: python -m recipes.embedded_target.vision_pretrain"
        )
    tower = CLIPVisionModel.from_pretrained(path)
    check_tower_shape(tower.config, vision_config, "vision_pretrain.from_tower", path)
    report_file = path / "stage1_report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return tower.state_dict(), report


def run_stage1(cfg: DictConfig, image_processor) -> tuple[dict, dict]:
    """Stage 1 as the recipe ``cfg`` describes it; saves the tower to ``vision_pretrain.save_to``.

    Seeds first, so the build and the stage-1-only CLI produce the same tower.
    """
    L.seed_everything(cfg.seed, workers=True)
    stage1 = {
        k: v
        for k, v in OmegaConf.to_container(cfg.vision_pretrain, resolve=True).items()
        if k not in ("from_target", "from_tower", "save_to")
    }
    t = time.perf_counter()
    state, metrics = pretrain_vision(
        OmegaConf.to_container(cfg.model.vision),
        image_processor,
        resolutions=tuple(cfg.corpus.resolutions),
        seed=cfg.seed,
        log_dir=cfg.log_dir,
        **stage1,
    )
    report = {"seconds": round(time.perf_counter() - t, 1), "steps": stage1["steps"], "heldout_patch_accuracy": metrics}
    if cfg.vision_pretrain.get("save_to"):
        save_tower(state, OmegaConf.to_container(cfg.model.vision), cfg.vision_pretrain.save_to, report)
    return state, report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="target_recipe")
def main(cfg: DictConfig) -> None:
    """Stage 1 only: ``python -m recipes.embedded_target.vision_pretrain [overrides]``; the build then takes
    the saved tower with ``vision_pretrain.from_tower=<save_to>``."""
    from .tokenizer import build_image_processor

    _, report = run_stage1(cfg, build_image_processor())
    print(json.dumps(report, indent=2))
    print(Path(cfg.vision_pretrain.save_to).resolve())


if __name__ == "__main__":
    main()
